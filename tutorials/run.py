"""Execute the tutorial notebooks: in full mode (outputs saved into the notebooks) or smoke mode.

    python tutorials/run.py                 # full mode, every notebook, outputs written back
    python tutorials/run.py quickstart      # full mode, one notebook
    python tutorials/run.py --smoke         # smoke mode (tiny settings), notebooks left unchanged

Each notebook reads ``SEDPPL_SMOKE`` (``1``: smoke mode) in its first code cell.
Notebooks run in a temporary working directory (their figures land there).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: In the order a new user reads them.
NOTEBOOKS = ["quickstart", "custom_model", "sbi_vs_mcmc", "real_spectra", "emulator"]


def execute(name: str, smoke: bool, timeout: int = 3600):
    """Run ``tutorials/<name>.ipynb`` top to bottom; return the executed notebook (errors raise)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(HERE / f"{name}.ipynb", as_version=4)
    before = os.environ.get("SEDPPL_SMOKE")
    os.environ["SEDPPL_SMOKE"] = "1" if smoke else "0"
    try:
        with tempfile.TemporaryDirectory() as work:
            NotebookClient(nb, timeout=timeout, kernel_name="python3",
                           resources={"metadata": {"path": work}}).execute()
    finally:
        if before is None:
            os.environ.pop("SEDPPL_SMOKE", None)
        else:
            os.environ["SEDPPL_SMOKE"] = before
    return nb


def main() -> int:
    import nbformat

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", default=NOTEBOOKS, help=f"notebooks (default: all of {NOTEBOOKS})")
    ap.add_argument("--smoke", action="store_true", help="tiny settings; do not write outputs back")
    args = ap.parse_args()
    for name in args.names:
        t = time.perf_counter()
        nb = execute(name, args.smoke)
        if not args.smoke:
            nbformat.write(nb, HERE / f"{name}.ipynb")
        print(f"{name}: {time.perf_counter() - t:.0f} s ({'smoke' if args.smoke else 'full'} mode)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
