"""`figures` stage: the notebooks of notebooks/, executed by papermill on this profile's results.

Each notebook draws one PNG into `<report.dir>/plots/` from this profile's metrics, samples or logs;
the executed copy is kept in `<report.dir>/notebooks/`. The notebooks are the figures that the
papers' declarations name (papers/), each its own DVC stage `figures@<notebook>`.

jupyter_client interrupts (SIGINT) a kernel before it asks it to shut down; a finished kernel
still handling a message then logs "KeyboardInterrupt caught in kernel" although nothing failed,
so the kernels here are shut down without it.
"""

from __future__ import annotations

from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

from diffrepro.errors import UserError
from diffrepro.papers import FRONT_PAGE_FIGURES, PAPERS
from diffrepro.paths import NOTEBOOK_DIR, logs_dir, metrics_dir

NOTEBOOKS = tuple(dict.fromkeys(f.notebook for f in FRONT_PAGE_FIGURES
                                + tuple(f for paper in PAPERS for f in paper.figures)))


class QuietShutdownKernelManager(AsyncKernelManager):
    """Interrupts a kernel only when asked to, never on the way to shutting it down."""

    async def _async_interrupt_kernel(self) -> None:
        if not self.shutting_down:
            await super()._async_interrupt_kernel()


def stage(params: dict, notebook: str | None = None) -> None:
    """Execute `notebook` (a name in NOTEBOOKS), or every one when None."""
    import papermill

    if notebook is not None and notebook not in NOTEBOOKS:
        raise UserError(f"{NOTEBOOK_DIR / notebook}.ipynb is not a figure of the report: "
                        f"name one of {', '.join(NOTEBOOKS)}")
    out = Path(params["report"]["dir"])
    parameters = {"metrics_dir": str(metrics_dir(params)), "logs_dir": str(logs_dir(params)),
                  "out_dir": str(out / "plots")}
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    for name in NOTEBOOKS if notebook is None else (notebook,):
        source, executed = NOTEBOOK_DIR / f"{name}.ipynb", out / "notebooks" / f"{name}.ipynb"
        try:
            papermill.execute_notebook(str(source), str(executed), parameters=parameters, kernel_name="python3",
                                       progress_bar=False, cwd=".", kernel_manager_class=QuietShutdownKernelManager)
        except papermill.PapermillExecutionError as err:
            first = (str(err.evalue).strip().splitlines() or [""])[0]
            raise UserError(f"{source} failed in cell {err.exec_count} ({err.ename}: {first}); "
                            f"the executed notebook is {executed}") from None
