"""Re-execute the research notebooks top to bottom in fresh kernels and save them with outputs.

    python notebooks/execute.py                  # every notebooks/[0-9][0-9]_*.ipynb, in place
    python notebooks/execute.py 02_router        # some of them (name or path)
    python notebooks/execute.py --check          # execute, report, do not write

Each notebook runs in a new ipykernel started with THIS interpreter (``sys.executable``), never a
``python3`` kernelspec found elsewhere on the machine, with the notebooks folder as working
directory and ``JAX_PLATFORMS=cpu`` unless the environment says otherwise. Old outputs are
cleared first, so the saved file is exactly one clean run (no hidden state). A cell that raises
stops the run with a non-zero exit status and the notebook is not written.

``tests/test_notebooks.py`` imports ``execute_notebook`` from this file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

NOTEBOOKS_DIR = Path(__file__).resolve().parent
KERNEL_NAME = "python3"


def notebook_paths(names: list[str] | None = None) -> list[Path]:
    """The numbered notebooks (``NN_*.ipynb``) in order, or the ones named (stem or path)."""
    if not names:
        return sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    out = []
    for name in names:
        path = Path(name)
        if not path.suffix:
            path = NOTEBOOKS_DIR / f"{name}.ipynb"
        if not path.exists():
            raise FileNotFoundError(f"notebook not found: {name} (looked for {path})")
        out.append(path)
    return out


def _kernel_manager():
    """A KernelManager whose kernel is ipykernel on ``sys.executable`` (same venv as us)."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = KernelSpec(
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name="Python 3 (ipykernel)",
        language="python",
        resource_dir=str(NOTEBOOKS_DIR),
    )

    class ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return spec

    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ThisInterpreter())


def execute_notebook(path: str | Path, *, timeout: int = 600, env: dict[str, str] | None = None):
    """Run one notebook from a clean state. Returns (executed NotebookNode, seconds).

    timeout: seconds allowed per cell. env: extra environment variables for the kernel.
    Raises ``nbclient.exceptions.CellExecutionError`` when a cell fails.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
    nb.metadata["kernelspec"] = {
        "name": KERNEL_NAME,
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    kernel_env = dict(os.environ)
    kernel_env.setdefault("JAX_PLATFORMS", "cpu")
    kernel_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    kernel_env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    kernel_env.update(env or {})
    client = NotebookClient(
        nb,
        km=_kernel_manager(),
        timeout=timeout,
        kernel_name=KERNEL_NAME,
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    # We made the kernel manager, so nbclient would leave the kernel running: ask for cleanup.
    client.execute(env=kernel_env, cleanup_kc=True)
    seconds = time.perf_counter() - start
    # Only the facts every run shares: keep diffs to real output changes.
    nb.metadata.get("language_info", {}).pop("version", None)
    return nb, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="*", help="names (e.g. 02_router) or paths; default: all")
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    p.add_argument("--check", action="store_true", help="execute only; do not write")
    args = p.parse_args(argv)

    import nbformat
    from nbclient.exceptions import CellExecutionError

    status = 0
    for path in notebook_paths(args.notebooks):
        try:
            nb, seconds = execute_notebook(path, timeout=args.timeout)
        except CellExecutionError as e:
            print(f"FAILED {path.name}:\n{e}", file=sys.stderr)
            status = 1
            continue
        if not args.check:
            nbformat.write(nb, path)
        size = path.stat().st_size / 1024
        print(f"{path.name}: {seconds:.1f} s" + ("" if args.check else f", saved ({size:.0f} KiB)"))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
