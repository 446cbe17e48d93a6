"""Run a list of `layerprune compare` jobs on every GPU of the machine, a few at a time per GPU, in the order
given (the first lines are the most important), and report how far they got. Built for the quality issue's
grid on a lent device, where one session's device time is short and every minute must keep both GPUs busy:

    python3 bench/quality_queue.py start JOBS WORK --per-gpu 2     # returns at once; the queue runs detached
    python3 bench/quality_queue.py status WORK                     # one line per job
    python3 bench/quality_queue.py stop WORK [JOB ...]             # end the queue (or only these jobs)

JOBS: one job per line, ``NAME MODEL compare-options ...`` (``#`` comments). Each job is one process,
``python3 -m layerprune.cli compare MODEL OPTIONS --out WORK/NAME --yes --quiet``, with CUDA_VISIBLE_DEVICES
set to its GPU; its log is WORK/NAME.log. `compare` is resumable, so a job the time cut off is continued by
starting the queue again with WORK kept. Per-seed directories are merged afterwards with bench/merge_grids.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def deal_slots(found: list[str], per_gpu: int, only: list[str] | None = None) -> list[str | None]:
    """One slot per job that may run at once: ``per_gpu`` on each GPU found (or on ``only`` of them), dealt
    round-robin so that a queue's first jobs land on different GPUs; one CPU slot when there is no GPU."""
    if not found:
        return [None] * per_gpu
    use = [g for g in found if g in only] if only else found
    if not use:
        raise SystemExit(f"error: --gpus {','.join(only or [])} names none of the GPUs found ({','.join(found)})")
    return [g for _ in range(per_gpu) for g in use]


def read_jobs(path: Path) -> list[tuple[str, list[str]]]:
    jobs = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, *args = shlex.split(line)
            jobs.append((name, args))
    names = [n for n, _ in jobs]
    if len(set(names)) != len(names):
        raise SystemExit(f"error: repeated job names in {path}")
    return jobs


def prepare(jobs: list[tuple[str, list[str]]]) -> None:
    """Convert each GGUF the jobs name to its cached HF directory once, before the jobs race to do it; a folder
    ``X.tokenizer/`` beside ``X.gguf`` replaces the converted tokenizer files (Gemma3's tokenizer needs a
    transformers >= 5.23 conversion, BENCHMARKS.md)."""
    import shutil

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from layerprune.models.loading import _gguf_to_dir

    for path in dict.fromkeys(Path(args[0]) for _, args in jobs if args and args[0].endswith(".gguf")):
        d = _gguf_to_dir(path)
        tok = path.with_suffix(".tokenizer")
        if tok.is_dir():
            for f in tok.iterdir():
                shutil.copy(f, d / f.name)
        print(f"{path} -> {d}", flush=True)


def run_queue(jobs: list[tuple[str, list[str]]], work: Path, per_gpu: int, only: list[str] | None = None) -> None:
    work.mkdir(parents=True, exist_ok=True)
    prepare(jobs)
    status_path = work / "status.json"
    status = {n: {"state": "queued"} for n, _ in jobs}
    lock = threading.Lock()
    todo = list(jobs)

    def save() -> None:
        tmp = status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status, indent=1))
        tmp.replace(status_path)

    def worker(gpu: str | None) -> None:
        while True:
            with lock:
                if not todo:
                    return
                name, args = todo.pop(0)
                status[name] = {"state": "running", "gpu": gpu, "start": time.time()}
                save()
            env = dict(os.environ)
            # CPU threads shared out: eight processes with a thread per core each thrashed 32 cores (session 10)
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(slots))))
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            cmd = [sys.executable, "-m", "layerprune.cli", "compare", *args, "--out", str(work / name), "--yes",
                   "--quiet"]
            with open(work / f"{name}.log", "a") as log:
                log.write(f"$ {shlex.join(cmd)}\n")
                log.flush()
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                with lock:
                    status[name]["pid"] = proc.pid
                    save()
                rc = proc.wait()
            with lock:
                state = "done" if rc == 0 else "stopped" if rc in (-signal.SIGTERM, -signal.SIGKILL) else "failed"
                status[name].update(state=state, rc=rc, end=time.time(),
                                    seconds=round(time.time() - status[name]["start"], 1))
                save()

    with lock:
        save()
    (work / "queue.pid").write_text(str(os.getpid()))
    signal.signal(signal.SIGTERM, lambda *_: (todo.clear(), None))  # stop: start nothing more, let workers end
    slots = deal_slots(gpus(), per_gpu, only)
    threads = [threading.Thread(target=worker, args=(g,)) for g in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (work / "queue.done").write_text(time.strftime("%Y-%m-%d %H:%M:%S"))


def show(work: Path) -> bool:
    """Print one line per job; True when the queue has ended."""
    p = work / "status.json"
    if not p.is_file():
        print(f"no queue in {work}")
        return True
    st = json.loads(p.read_text())
    now = time.time()
    for name, s in st.items():
        extra = f"{s['seconds']} s, rc {s['rc']}" if "seconds" in s else \
            (f"{now - s['start']:.0f} s so far" if "start" in s else "")
        rj = work / name / "results.json"
        cells = len(json.loads(rj.read_text()).get("runs", [])) if rj.is_file() else 0
        print(f"{name:24s} {s['state']:8s} gpu {s.get('gpu')}  {cells:3d} cells  {extra}")
    return (work / "queue.done").is_file()


def stop(work: Path, names: list[str]) -> None:
    """End the queue in ``work``: its driver starts nothing more, and its running jobs (or only ``names``) get
    SIGTERM; `compare` writes results.json after each cell, so what finished stays."""
    st = json.loads((work / "status.json").read_text()) if (work / "status.json").is_file() else {}
    if not names and (work / "queue.pid").is_file():
        try:
            os.kill(int((work / "queue.pid").read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass
    for name, s in st.items():
        if s.get("state") == "running" and "pid" in s and (not names or name in names):
            try:
                os.kill(s["pid"], signal.SIGTERM)
                print(f"stopped {name} (pid {s['pid']})")
            except ProcessLookupError:
                pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("jobs", type=Path)
    s.add_argument("work", type=Path)
    s.add_argument("--per-gpu", type=int, default=2)
    s.add_argument("--gpus", default="", help="comma-separated GPU indices this queue may use (default: all)")
    s.add_argument("--foreground", action="store_true", help="run here instead of detached (tests, CPU)")
    w = sub.add_parser("status")
    w.add_argument("work", type=Path)
    k = sub.add_parser("stop")
    k.add_argument("work", type=Path)
    k.add_argument("jobs", nargs="*")
    a = ap.parse_args()
    if a.cmd == "stop":
        stop(a.work, a.jobs)
        return 0
    if a.cmd == "start":
        jobs = read_jobs(a.jobs)
        if a.foreground:
            run_queue(jobs, a.work, a.per_gpu, [g for g in a.gpus.split(",") if g] or None)
            show(a.work)
            return 0
        a.work.mkdir(parents=True, exist_ok=True)
        (a.work / "queue.done").unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "start", str(a.jobs), str(a.work), "--per-gpu", str(a.per_gpu), "--gpus", a.gpus,
               "--foreground"]
        # a new session: the device tool lets such a process outlive the call that started it
        subprocess.Popen(cmd, stdout=open(a.work / "queue.log", "a"), stderr=subprocess.STDOUT,
                         start_new_session=True)
        print(f"queue started: {len(jobs)} jobs, {a.per_gpu} per GPU, in {a.work}")
        return 0
    show(a.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
