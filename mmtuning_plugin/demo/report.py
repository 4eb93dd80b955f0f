"""What `mmtune demo` prints: the seed, each arm's target plan, a progress bar, the E/F/O table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from ..console import Table

from .runner import DemoSettings, load_recipes


class DemoConsole:
    def __init__(self, console: Console, settings: DemoSettings):
        self.console = console
        self.settings = settings
        self.progress: Progress | None = None
        self.tasks: dict[str, Any] = {}  # arm -> its progress task (arms may train at once)
        self.accuracy: dict[str, str] = {}
        self.finished: set[str] = set()

    def intro(self) -> None:
        from ..report import inspect_report
        from ..report_tables import print_report
        from ..loading import load_skeleton

        s = self.settings
        self.console.print(
            f"[bold]mmtune demo[/]  seed {s.seed}, {s.steps} steps x batch {s.batch_size} per arm, "
            f"{'4-bit NF4 base (QLoRA)' if s.four_bit else '32-bit base'}, {s.threads} thread(s) per arm\n"
            f"task: the embedded tiny LLaVA knows colours and shapes; it learns [bold]where the shape is[/]. "
            f"Scored by greedy generation on {s.eval_items} held-out items per set.")
        skeleton = load_skeleton(str(s.model_dir))
        for name, recipe in load_recipes().items():
            if name in s.arms:
                print_report(inspect_report(recipe.get("label", name), skeleton, recipe["mmtuning"]), self.console)

    def event(self, kind: str, arm: str, *args: Any) -> None:
        if kind == "start":
            if self.progress is None:
                self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[acc]}"), TimeElapsedColumn(), console=self.console)
                self.progress.start()
            self.tasks[arm] = self.progress.add_task(f"training {arm}", total=args[0],
                                                     acc=self.accuracy.get(arm, ""))
        elif kind == "keep":
            from ..keep import describe

            for line in describe(args[0]):
                self.console.print(line, highlight=False, markup=False)
        elif kind == "step" and arm in self.tasks:
            self.progress.update(self.tasks[arm], completed=args[0])
        elif kind == "eval":
            step, accuracies = args
            self.accuracy[arm] = f"target {100 * accuracies['target']:.0f}%  general {100 * accuracies['general']:.0f}%"
            if arm in self.tasks:
                self.progress.update(self.tasks[arm], acc=self.accuracy[arm])
            else:
                self.console.print(f"{arm}: before training  {self.accuracy[arm]}")
        elif kind == "done" and arm in self.tasks:
            self.finished.add(arm)
            if self.finished >= set(self.tasks):
                self.progress.stop()
                self.progress, self.tasks, self.finished = None, {}, set()

    def skills(self, report: dict[str, Any]) -> None:
        """Accuracy per question type before -> after: which skills each arm kept."""
        arms = list(report["arms"].values())
        kinds = list(dict.fromkeys(k for arm in arms for k in arm["before"].get("by_question", {})))
        if not kinds:
            return
        table = Table(title="which skills were kept (accuracy % per question type, before -> after)",
                      title_justify="left")
        table.add_column("arm")
        for kind in kinds:
            table.add_column(kind, justify="right")
        for arm in arms:
            before, after = arm["before"]["by_question"], arm["after"]["by_question"]
            table.add_row(arm["label"], *(f"{100 * before[k]:.0f} -> {100 * after[k]:.0f}" for k in kinds))
        self.console.print(table)

    def summary(self, report: dict[str, Any]) -> None:
        from ..console import human

        table = Table(title=f"E/F/O on held-out items (seed {report['seed']})", title_justify="left")
        for column in ("arm", "trainable", "target %", "general %", "E", "F", "O"):  # a `before -> after` stays whole
            table.add_column(column, justify="left" if column == "arm" else "right",
                             no_wrap=column in ("target %", "general %"))
        for arm in report["arms"].values():
            b, a = arm["before"], arm["after"]
            table.add_row(arm["label"], human(arm["trainable_params"]),
                          f"{100 * b['target']:.1f} -> {100 * a['target']:.1f}",
                          f"{100 * b['general']:.1f} -> {100 * a['general']:.1f}",
                          f"{arm['E']:+.1f}", f"{arm['F']:+.1f}", f"[bold]{arm['O']:+.1f}[/]")
        self.console.print(table)
        self.console.print("E = target accuracy gain, F = change on the general set (negative = forgetting), "
                           "O = E + F; accuracy points, greedy generation, exact match.")
        self.skills(report)
        arms = list(report["arms"].values())
        if len(arms) == 2:
            best, other = sorted(arms, key=lambda a: a["O"], reverse=True)
            items = report["eval"]["general_items"]
            self.console.print(f"higher O: [bold]{best['label']}[/] ({best['O']:+.1f} vs {other['O']:+.1f} for "
                               f"{other['label']}; one general item is {100 / items:.1f} points)")
        out = self.settings.out
        self.console.print(f"adapters: {', '.join(a['adapter'] for a in arms)}\nplot: {report['plot']}\n"
                           f"numbers: {out / 'results.json'}  ({report['seconds']:.0f}s)")
