"""The sweep's live console: one progress bar and one line per trial event.

It replaces Tune's status tables (shown only with `--verbose`). The CLI hands it to the sweep
as a Tune callback; it is the only part of a sweep that prints. Outside a terminal the bar is
a plain line at most every 30 s (sweeps.progress), and the event lines read as they do on one.
"""

from __future__ import annotations

from ray import tune

from sweeps.progress import progress_bar
from sweeps.search.callback_state import LocalState
from sweeps.vocabulary import SUMMARY_METRICS, trial_label

#: Result keys shown on a trial's closing line, with their labels.
SHOWN = tuple(SUMMARY_METRICS.items())


class SweepDisplay(LocalState, tune.Callback):
    """A bar of trials done out of `num_samples` (running, stopped and failed counts, elapsed
    time, ETA) and a line when a trial starts, is stopped early, finishes or fails."""

    def __init__(self, num_samples: int, stream=None):
        self.num_samples = num_samples
        self.stream = stream
        self._reset()

    def _reset(self) -> None:
        self._bar = None
        self._counts = {"running": 0, "done": 0, "stopped": 0, "failed": 0}
        self._stopping: set[str] = set()

    @property
    def bar(self):
        if self._bar is None:
            self._bar = progress_bar("trials", "done", total=self.num_samples, stream=self.stream)
        return self._bar

    def on_step_begin(self, iteration, trials, **info):
        if self._bar is None and trials:  # a resumed sweep: count what finished before
            self.bar.update(sum(t.status in ("TERMINATED", "ERROR") for t in trials))
        if self._bar is not None:
            self._bar.refresh()  # outside a terminal: the progress line, when it is due

    def on_trial_start(self, iteration, trials, trial, **info):
        self._counts["running"] += 1
        self._event("started ", trial, "")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("done"):  # a scheduler (ASHA) decided to stop it
            self._stopping.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if last.get("error"):
            self._end(trial, "failed", f"  {last['error']}")
        elif trial.trial_id in self._stopping and not last.get("sae_dir"):
            self._end(trial, "stopped", f" at step {last.get('step', '?')}{_metrics(last)}")
        else:
            self._end(trial, "done", f" step {last.get('step', '?')}{_metrics(last)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        text = ""
        if trial.error_file:
            try:
                with open(trial.error_file) as f:
                    lines = f.read().strip().splitlines()
                text = f"  {lines[-1]}" if lines else ""
            except OSError:
                pass
        self._end(trial, "failed", text)

    def on_experiment_end(self, trials, **info):
        if self._bar is not None:
            self._bar.close()

    def _end(self, trial, kind: str, text: str) -> None:
        self._counts["running"] = max(0, self._counts["running"] - 1)
        self._counts[kind] += 1
        self._stopping.discard(trial.trial_id)
        word = {"done": "finished", "stopped": "stopped ", "failed": "failed  "}[kind]
        self._event(word, trial, text)
        self.bar.update(1)

    def _event(self, word: str, trial, text: str) -> None:
        line = f"{word} {trial.trial_id}  {trial_label(trial.config)}{text}"
        self.bar.print_line(line)  # above the bar, on a terminal
        self.bar.set_postfix_str(", ".join(f"{n} {k}" for k, n in self._counts.items() if n))


def _metrics(result: dict) -> str:
    shown = [
        f"{label} {result[key]:.4g}"
        for key, label in SHOWN
        if isinstance(result.get(key), (int, float))
    ]
    return ("  " + "  ".join(shown)) if shown else ""
