"""How much of a fresh machine's Python start-up is reading files: the CLI's imports (layerprune.cli, transformers'
auto classes and LLaMA's modeling module) timed in a fresh interpreter, cold and then warm; with ``--preread`` a
pool of threads first reads the imported packages' files in parallel (page cache) while the import runs.

    python3 bench/probe_import_io.py --out $OUT/io.json [--preread]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

IMPORTS = ("import layerprune.cli, layerprune.api; import transformers; from transformers import AutoModelForCausalLM; "
           "import transformers.models.llama.modeling_llama")
CODE = f"import time; t = time.perf_counter(); {IMPORTS}; print(time.perf_counter() - t)"


def timed(env=None) -> dict:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, check=True)
    return {"process_s": round(time.perf_counter() - t, 3), "imports_s": round(float(out.stdout.split()[-1]), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preread", action="store_true")
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache first (root only)")
    ap.add_argument("--packages", default="", help="comma-separated packages to pre-read (default: _preread's)")
    ap.add_argument("--workers", type=int, default=16)
    a = ap.parse_args()
    if a.drop_caches:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    rows = {"preread": a.preread}
    if a.preread:
        import importlib.util  # noqa: PLC0415

        # loaded by path: importing the package would import torch here and warm the cache for the child
        spec = importlib.util.spec_from_file_location(
            "_preread", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "layerprune", "_preread.py"))
        _preread = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_preread)

        t = time.perf_counter()
        names = tuple(a.packages.split(",")) if a.packages else _preread.PACKAGES
        handle = _preread.start(names, a.workers)
        rows["packages"], rows["workers"] = list(names), a.workers
        rows["cold"] = timed()
        handle.join()
        rows["preread_s"] = round(time.perf_counter() - t, 3)
        rows["preread_bytes"] = handle.bytes
        rows["preread_files"] = handle.files
    else:
        rows["cold"] = timed()
    rows["warm"] = timed()
    rows["warm2"] = timed()
    print(json.dumps(rows), flush=True)
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
