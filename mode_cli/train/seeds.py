"""Seeds in a sweep: runs that differ only in `train.seed` form a group, summarised by the mean and
sample standard deviation of each metric; two groups that differ in one setting are compared seed
by seed, with a 95% t-interval of the paired difference.

    mode train -m recipe=R loss=mode,final-only train.seed=0,1,2

gives the groups `loss=mode` and `loss=final-only` (three runs each) and one comparison,
`loss: mode - final-only`: per metric, the difference of the two runs with the same seed,
averaged over the seeds, mean ± t(n-1) * s / sqrt(n). Pairing by seed removes what the seed does
to both runs alike (data order, initialisation), so a real difference shows with fewer seeds
than comparing the two groups' means would need. An interval that excludes 0 is marked.

Only finished runs (`ok`) count. The metrics of a run are those the sweep table shows: the final
train loss, the eval loss of the final layer, the ensemble and each other selected layer, and the
exact-match answer accuracy of the tuned final head and ensemble when the report has them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from mode_cli.eval.stats import CONFIDENCE, mean_std, t_interval

SEED_KEY = "train.seed"


@dataclass(frozen=True)
class Metric:
    """One number each run has (or lacks): `key` in sweep.json, `label` in tables and plots;
    `higher_is_better` tells how to read a difference."""

    key: str
    label: str
    higher_is_better: bool = False


def run_metrics(run) -> dict[str, float]:
    """The metrics of one sweep run (`sweep.SweepRun`), by key; missing ones are left out."""
    values: dict[str, float | None] = {
        "train_loss": run.train_loss,
        "eval_final": run.eval_loss.get("final"),
        "eval_ensemble": run.eval_loss.get("ensemble"),
    }
    for layer, loss in run.eval_loss.get("layers", {}).items():
        values[f"eval_L{layer}"] = loss
    for head in ("final", "ensemble"):
        values[f"em_{head}"] = run.answers.get(head)
    return {key: float(value) for key, value in values.items() if value is not None}


def metric_of(key: str) -> Metric:
    if key.startswith("em_"):
        return Metric(key, f"EM {key.removeprefix('em_')}", higher_is_better=True)
    if key.startswith("eval_L"):
        return Metric(key, f"eval L{key.removeprefix('eval_L')}")
    return Metric(key, key.replace("_", " "))


def metrics_of(runs) -> list[Metric]:
    """The metrics any of `runs` has, in table order: train loss, eval final, eval ensemble, eval
    per layer (by depth), exact match final, exact match ensemble."""
    keys = {key for run in runs for key in run_metrics(run)}
    layers = sorted((k for k in keys if k.startswith("eval_L")), key=lambda k: int(k[6:]))
    order = ["train_loss", "eval_final", "eval_ensemble", *layers, "em_final", "em_ensemble"]
    return [metric_of(key) for key in order if key in keys]


@dataclass
class Group:
    """Runs with the same settings (the swept values other than the seed)."""

    settings: dict[str, str]
    runs: list = field(default_factory=list)

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings.items()) or "(all runs)"

    def by_seed(self, metric: str) -> dict[int, float]:
        """The metric of each finished run, by its seed."""
        values = {}
        for run in self.runs:
            value = run_metrics(run).get(metric)
            if run.status == "ok" and value is not None:
                values[seed_of(run)] = value
        return values

    def summary(self, metric: str) -> dict | None:
        """`{n, mean, std, values: {seed: value}}` of a metric over the group's runs (std is the
        sample standard deviation, None for one run); None when no run has it."""
        values = self.by_seed(metric)
        if not values:
            return None
        mean, std = mean_std(list(values.values()))
        return {"n": len(values), "mean": mean, "std": std, "values": values}


def seed_of(run) -> int:
    """A run's seed: its config's `train.seed` (swept or not)."""
    if run.cfg is not None:
        return int(run.cfg.train.seed)
    return int(run.swept[SEED_KEY])


def group_runs(runs, swept_keys: list[str]) -> list[Group]:
    """The runs grouped by their swept values other than the seed, in the sweep's order."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        settings = {k: v for k, v in run.swept.items() if k in swept_keys and k != SEED_KEY}
        key = tuple(settings.items())
        groups.setdefault(key, Group(settings)).runs.append(run)
    return list(groups.values())


@dataclass
class Comparison:
    """Two groups whose settings differ in exactly `key`: `first` (earlier in the sweep) minus
    `second`, per metric, paired by seed."""

    key: str
    first: Group
    second: Group

    def label(self) -> str:
        return f"{self.key}: {self.first.settings[self.key]} - {self.second.settings[self.key]}"

    def shared(self) -> str:
        """The settings both groups share, in words."""
        same = {k: v for k, v in self.first.settings.items() if k != self.key}
        return " ".join(f"{k}={v}" for k, v in same.items())

    def difference(self, metric: str) -> dict | None:
        """`{n, seeds, mean, std, low, high, excludes_zero}` of first - second over the seeds both
        groups finished; low/high: the 95% t-interval (None below two seeds). None without a
        common seed."""
        first, second = self.first.by_seed(metric), self.second.by_seed(metric)
        seeds = sorted(set(first) & set(second))
        if not seeds:
            return None
        result = t_interval([first[s] - second[s] for s in seeds], CONFIDENCE)
        return {
            "n": result.n,
            "seeds": seeds,
            "mean": result.mean,
            "std": result.std,
            "low": result.low,
            "high": result.high,
            "excludes_zero": result.excludes_zero,
        }


def comparisons(groups: list[Group]) -> list[Comparison]:
    """Every pair of groups whose settings differ in exactly one key, in the sweep's order."""
    found = []
    for first, second in itertools.combinations(groups, 2):
        if first.settings.keys() != second.settings.keys():
            continue
        differ = [k for k in first.settings if first.settings[k] != second.settings[k]]
        if len(differ) == 1:
            found.append(Comparison(differ[0], first, second))
    return found


def summary_json(runs, swept_keys: list[str]) -> dict:
    """What sweep.json holds about seeds: the groups with their per-metric summaries and the
    paired comparisons."""
    groups = group_runs(runs, swept_keys)
    metrics = metrics_of(runs)

    def json_values(summary: dict | None) -> dict | None:
        if summary is None:
            return None
        return {**summary, "values": {str(s): v for s, v in summary["values"].items()}}

    return {
        "key": SEED_KEY,
        "confidence": CONFIDENCE,
        "groups": [
            {
                "settings": group.settings,
                "runs": [run.index for run in group.runs],
                "seeds": [seed_of(run) for run in group.runs],
                "metrics": {m.key: json_values(group.summary(m.key)) for m in metrics},
            }
            for group in groups
        ],
        "comparisons": [
            {
                "key": comparison.key,
                "first": comparison.first.settings,
                "second": comparison.second.settings,
                "metrics": {m.key: comparison.difference(m.key) for m in metrics},
            }
            for comparison in comparisons(groups)
        ],
    }
