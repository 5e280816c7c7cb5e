"""Side-by-side benchmarks of jmix-agent's hot paths against real reference tools.

Each benchmark runs our code and a reference on the same input, on the same machine,
alternating them for several rounds, and prints the median times and their ratio
(ours / reference; below 1.0 means faster than the reference):

- seal:   sealing a study (tar + X25519/HKDF + AES-256-GCM + hashes + signature) against
          ``tar | openssl enc -aes-256-ctr | sha256sum`` over the same files;
- open:   verifying and unpacking that envelope against ``openssl enc -d | tar -x``;
- ingest: DCMTK storescu sending a study to our C-STORE SCP against DCMTK storescp;
- upload: our SFTP transport against OpenSSH ``sftp`` putting the same envelope.

Run:  .venv/bin/python bench/bench.py [--mb 200] [--instances 400] [--rounds 3]
Everything runs on 127.0.0.1. Numbers are for comparison on one machine, not targets.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from agent.demo import free_port, sample_paths, wait_for_port
from agent.devtools.sshd import SshdServer
from agent.jmix import keys
from agent.jmix.assertion import TrustedKeys
from agent.jmix.reader import OpenPolicy, open_envelope
from agent.jmix.seal import Party, PayloadFile, seal_envelope

ENV = dict(os.environ, TCP_NODELAY="1")


def make_study(folder: Path, instances: int, target_mb: float) -> list[Path]:
    """Write ``instances`` copies of CT_small.dcm with new UIDs, padded to ``target_mb`` in all."""
    template = dcmread(sample_paths(["CT_small.dcm"])[0])
    study_uid = generate_uid()
    per_file = int(target_mb * 1024 * 1024 / instances)
    pixels = template.Rows * template.Columns * 2
    frames = max(1, per_file // pixels)
    template.PixelData = os.urandom(pixels * frames)
    template.NumberOfFrames = frames
    template.StudyInstanceUID = study_uid
    paths = []
    for index in range(instances):
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.InstanceNumber = index + 1
        path = folder / f"{template.SOPInstanceUID}.dcm"
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def compare(
    name: str,
    ours: Callable[[], object],
    reference: Callable[[], object],
    rounds: int,
    reference_name: str,
) -> None:
    our_times, ref_times = [], []
    for _ in range(rounds):
        our_times.append(timed(ours))
        ref_times.append(timed(reference))
    mine, theirs = statistics.median(our_times), statistics.median(ref_times)
    print(
        f"{name:<7} ours {mine:7.3f} s   {reference_name:<34} {theirs:7.3f} s   "
        f"ratio {mine / theirs:5.2f}"
    )


def bench_seal_open(root: Path, files: list[Path], rounds: int) -> None:
    signing, encryption = keys.generate_signing_key(), keys.generate_encryption_key()
    payload = [PayloadFile(f"dicom/{path.name}", path) for path in files]
    out = root / "sealed"
    out.mkdir()
    holder: dict[str, Path] = {}

    def seal() -> None:
        shutil.rmtree(out)
        out.mkdir()
        holder["env"] = seal_envelope(
            payload,
            {"patient": {"id": "BENCH"}},
            out,
            Party("org:a", "A"),
            signing,
            Party("org:b", "B"),
            encryption.public_key(),
        ).path

    study_dir = files[0].parent
    reference_out = root / "reference.enc"

    def reference_seal() -> None:
        subprocess.run(
            f"tar -C {study_dir} -cf - . | openssl enc -aes-256-ctr -pbkdf2 -pass pass:bench "
            f"| tee {reference_out} | sha256sum > /dev/null",
            shell=True,
            check=True,
        )

    compare("seal", seal, reference_seal, rounds, "tar | openssl enc | sha256sum")

    policy = OpenPolicy(
        [encryption], TrustedKeys({"org:a": [keys.raw_public(signing.public_key())]}), "org:b"
    )
    work = root / "open-work"
    unpack = root / "reference-unpack"

    def open_ours() -> None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        open_envelope(holder["env"], policy, work)

    def open_reference() -> None:
        shutil.rmtree(unpack, ignore_errors=True)
        unpack.mkdir()
        subprocess.run(
            f"openssl enc -d -aes-256-ctr -pbkdf2 -pass pass:bench -in {reference_out} "
            f"| tar -C {unpack} -xf -",
            shell=True,
            check=True,
        )

    compare("open", open_ours, open_reference, rounds, "openssl enc -d | tar -x")
    holder["keep"] = holder["env"]
    shutil.copytree(holder["env"], root / "envelope.JMIX")


def bench_ingest(root: Path, files: list[Path], rounds: int) -> None:
    from agent.dicom.scp import StorageSCP
    from agent.pipeline.spool import Spool

    class NullAudit:
        def record(self, event: str, **fields: object) -> None:
            del event, fields

    def send(port: int) -> None:
        subprocess.run(
            ["/usr/bin/storescu", "-aec", "ANY", "127.0.0.1", str(port), *map(str, files)],
            env=ENV,
            check=True,
            capture_output=True,
        )

    def ours() -> None:
        spool_dir = root / "spool"
        shutil.rmtree(spool_dir, ignore_errors=True)
        port = free_port()
        scp = StorageSCP("ANY", "127.0.0.1", port, Spool(spool_dir), NullAudit())
        scp.start()
        try:
            send(port)
        finally:
            scp.stop()

    def reference() -> None:
        received = root / "storescp"
        shutil.rmtree(received, ignore_errors=True)
        received.mkdir()
        port = free_port()
        process = subprocess.Popen(
            ["/usr/bin/storescp", "-od", str(received), "-aet", "ANY", str(port)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port)
            send(port)
        finally:
            process.terminate()
            process.wait()

    compare("ingest", ours, reference, rounds, "storescu -> DCMTK storescp")


def bench_upload(root: Path, rounds: int) -> None:
    from agent.transport.sftp import SftpTransport

    envelope = root / "envelope.JMIX"
    (root / "sshd").mkdir()
    server = SshdServer.create(root / "sshd")
    server.start()
    try:
        counter = {"n": 0}

        def ours() -> None:
            counter["n"] += 1
            transport = SftpTransport(
                server.host,
                server.port,
                server.user,
                server.client_key_path,
                server.host_public_key,
                str(server.inbox),
            )
            transport.deliver(envelope, f"ours-{counter['n']}.JMIX")
            transport.close()

        known_hosts = root / "known_hosts"
        known_hosts.write_text(f"[{server.host}]:{server.port} {server.host_public_key}\n")

        def reference() -> None:
            counter["n"] += 1
            batch = root / "batch"
            target = f"{server.inbox}/ref-{counter['n']}.JMIX"
            batch.write_text(f"put -r {envelope} {target}\n")
            subprocess.run(
                [
                    "sftp",
                    "-q",
                    "-b",
                    str(batch),
                    "-P",
                    str(server.port),
                    "-i",
                    str(server.client_key_path),
                    "-o",
                    f"UserKnownHostsFile={known_hosts}",
                    "-o",
                    "StrictHostKeyChecking=yes",
                    f"{server.user}@{server.host}",
                ],
                check=True,
                capture_output=True,
            )

        compare("upload", ours, reference, rounds, "OpenSSH sftp put -r")
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200.0, help="study size in MiB")
    parser.add_argument("--instances", type=int, default=400, help="instances in the study")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per benchmark")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jmix-bench-") as temporary:
        root = Path(temporary)
        study = root / "study"
        study.mkdir()
        files = make_study(study, args.instances, args.mb)
        size = sum(path.stat().st_size for path in files) / 1024 / 1024
        print(
            f"study: {len(files)} instances, {size:.0f} MiB; {os.cpu_count()} CPUs; "
            f"median of {args.rounds} rounds"
        )
        bench_seal_open(root, files, args.rounds)
        bench_ingest(root, files, args.rounds)
        bench_upload(root, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
