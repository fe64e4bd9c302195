"""Servers the tests start for real (MLflow tracking server, `mlflow models serve`) and end by their own handles."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

from moekd_ray import process_group

# One copy, shared with docs/ and the package.
group_alive, end_group, free_port, LOOPBACK = (process_group.group_alive, process_group.end_group,
                                               process_group.free_port, process_group.LOOPBACK)

ROOT = Path(__file__).resolve().parents[1]
START_SERVER = ROOT / "mlflow" / "start_server.sh"
# ~10 s on an idle 2-core machine (STACK.md); from 20 to over 60 s measured here with the cores busy.
HEALTH_TIMEOUT_S = 300  # an MLflow server's start took over 120 s beside other test runs (load 10-25)


def server_env(**extra: str) -> dict:
    """This interpreter's environment (its mlflow on PATH), without MLflow settings leaking in from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MOEKD_MLFLOW"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = HEALTH_TIMEOUT_S) -> str:
    """The body of the first successful GET of `url`; fails with the server's log tail if none comes in time."""
    body = process_group.wait_http(url, proc, timeout_s)
    if body is None:
        raise AssertionError(f"no answer from {url} in {timeout_s} s:\n{log.read_text()[-3000:]}")
    return body


def start_group(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    """`cmd` in its own process group (so `end_group` ends all of it), output to `log`."""
    return subprocess.Popen(cmd, env=server_env(**env), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port`, from /proc/net/tcp and tcp6."""
    found = set()
    for name, size in (("tcp", 4), ("tcp6", 16)):
        table = Path("/proc/net") / name
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, size, 4))  # each 32-bit word is little-endian
            family = socket.AF_INET if size == 4 else socket.AF_INET6
            found.add(socket.inet_ntop(family, raw))
    return found


def other_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def save_tiny_student(folder: Path, seed: int = 0, head_scale: float = 1.0,
                      canonical: bool = False) -> tuple[Path, Path]:
    """A tiny random RoBERTa classifier and BPE tokenizer saved as the pipeline saves a student. At random init its
    probabilities differ only in the 5th decimal; `head_scale` multiplies the output layer to spread them (its bias
    then centres the logits of the training snippets on 0, so that they do not all saturate). `canonical`: its
    tokenizer reads identifier-canonicalised code (data.input_transform canonical_identifiers)."""
    import torch

    from moekd_ray.config import ArchConfig
    from moekd_ray.models import build_model
    from moekd_ray.tokenization import train_bpe

    arch = ArchConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, ffn_size=64, max_length=64)
    code = [f"int f{i}(char *buf, int n) {{ int k = {i}; if (n > k) memcpy(buf, \"x\", n); return k; }}"
            for i in range(50)]
    model_dir, tok_dir = folder / "student", folder / "tokenizer"
    model, tokenizer = build_model(arch, seed).eval(), train_bpe(code, arch.vocab_size, arch.max_length, canonical)
    if head_scale != 1.0:
        with torch.no_grad():
            model.classifier.out_proj.weight.mul_(head_scale)
            logits = model(**tokenizer(code, padding=True, return_tensors="pt")).logits
            model.classifier.out_proj.bias.sub_(logits.mean(0))
    model.save_pretrained(str(model_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(tok_dir))
    return model_dir, tok_dir


@contextlib.contextmanager
def registered_tiny_student(folder: Path, name: str, **student):
    """A tiny student (`save_tiny_student(folder, **student)`) logged with tracking.log_student_model and registered
    as `name` v1 in a sqlite store of its own under `folder` (artifacts in `folder`/artifacts), which is the tracking
    URI while inside. Yields (model URI, tracking URI, the student's model folder, its tokenizer folder)."""
    import mlflow

    from moekd_ray.tracking import log_student_model

    model_dir, tok_dir = save_tiny_student(folder, **student)
    tracking_uri = f"sqlite:///{folder}/mlruns.db"
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        # (an experiment of its own: the default one would put artifacts in ./mlruns of the working directory)
        experiment = mlflow.create_experiment(name, artifact_location=(folder / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            uri = log_student_model(model_dir, tok_dir, {}, name, {"test_f1": 0.5})
        yield uri, tracking_uri, model_dir, tok_dir
    finally:
        mlflow.set_tracking_uri(old)


# ------------------------------------------------------------------------------------------------ PostgreSQL
PG_FIX = ("PostgreSQL's server binaries (initdb, pg_ctl) are not on PATH nor in /usr/lib/postgresql/*/bin: "
          "apt-get install postgresql (Debian/Ubuntu) or dnf install postgresql-server (Fedora)")


def postgres_bin(name: str) -> str | None:
    """`name` (initdb, pg_ctl) from PATH, else from Debian's versioned folder (not on PATH by default), newest first."""
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return versions[-1] if versions else None


@contextlib.contextmanager
def postgres(user: str = "moekd"):
    """A throwaway PostgreSQL server from the machine's binaries: a temporary folder, `initdb` (trust auth, superuser
    `user`), listening on 127.0.0.1 and a free port (its Unix socket in the folder); yields the port, then stops it
    and removes the folder. initdb refuses to run as root, so as root the folder belongs to `nobody` and both
    commands run through `runuser -u nobody --`."""
    import shutil
    import tempfile

    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        raise FileNotFoundError(PG_FIX)
    # Not under pytest's tmp_path: its 0700 parents would keep `nobody` out; and a Unix socket path has ~100 chars.
    folder = Path(tempfile.mkdtemp(prefix="moekd-pg-"))
    as_owner = []
    if os.geteuid() == 0:
        shutil.chown(folder, "nobody")
        as_owner = ["runuser", "-u", "nobody", "--"]
    data, port = folder / "data", free_port()
    run = dict(capture_output=True, text=True, timeout=180, cwd=folder)
    try:
        done = subprocess.run([*as_owner, initdb, "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8"], **run)
        assert done.returncode == 0, f"initdb failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        done = subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-w", "-t", "120", "-l", str(folder / "log"),
                               "-o", f"-k {folder} -p {port} -c listen_addresses={LOOPBACK}", "start"], **run)
        log = folder / "log"
        tail = log.read_text()[-3000:] if log.exists() else ""
        assert done.returncode == 0, f"pg_ctl start failed:\n{done.stderr[-2000:]}\n{tail}"
        yield port
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], **run)
        shutil.rmtree(folder, ignore_errors=True)
