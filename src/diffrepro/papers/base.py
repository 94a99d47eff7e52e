"""What a paper's declaration is made of: its table, claims, figures and own report section."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Table:
    title: str
    paper_note: str              # what the paper compared and found
    default_note: str            # what stands for it in the embedded default (smoke too)
    rows: dict[str, dict]        # run name → the paper's numbers for the row it stands for
    columns: tuple[str, ...]     # metric keys shown
    # row's run → the run that adopts the authors' released checkpoint for it (`<run>_released`);
    # where the profile has that run, the table shows its numbers beside the trained run's
    released: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Claim:
    text: str
    metric: str
    method: str
    baseline: str
    lower_is_better: bool = True


@dataclass(frozen=True)
class SpeedClaim:
    text: str
    pair: str                    # `<method>_vs_<baseline>` in metrics/<profile>/speed.json
    measure: str                 # per_step | per_image | to_budget (see speed.py)
    paper_ratio: float           # the paper's speed-up


@dataclass(frozen=True)
class Regime:
    """The variable a paper's claim depends on: `regime.<variable>` in params, read by the claim's
    runs; a `dvc exp` sweep over it maps where the claim holds (`python -m diffrepro regimes`)."""
    variable: str                # the key under `regime` in params.yaml
    label: str                   # the axis label of its plot
    claim: Claim                 # the claim whose verdict it moves
    papers_side: str             # where the paper makes its claim, in words


@dataclass(frozen=True)
class Figure:
    notebook: str                # notebooks/<notebook>.ipynb draws <report.dir>/plots/<notebook>.png
    caption: str


@dataclass(frozen=True)
class Paper:
    key: str                     # the `paper` of results.csv and of the claims
    table: Table
    # profile → the paper's numbers of that profile's own setting, for the rows where they differ
    # from the table's ({}: the paper publishes no number for that row in this setting)
    rows_by_profile: dict[str, dict[str, dict]] = field(default_factory=dict)
    claims: tuple[Claim, ...] = ()
    speed_claims: tuple[SpeedClaim, ...] = ()  # measured by the `speed` stage, method and baseline interleaved
    # (method, baseline) runs the `speed` stage interleaves: the speed claims' and the speed-up column's
    speed_pairs: tuple[tuple[str, str], ...] = ()
    figures: tuple[Figure, ...] = ()           # shown under the table
    speedup_baseline: str | None = None        # the `speedup` column: this run's step time / each run's
    regime: Regime | None = None               # the claim's regime variable and its sweep
    section: Callable[[dict, dict], str] | None = None  # (metrics, speed) → markdown after the figures, "" for none

    def rows(self, profile: str) -> dict[str, dict]:
        """The paper's numbers for each row of the table in `profile`'s setting."""
        return {**self.table.rows, **self.rows_by_profile.get(profile, {})}
