"""What the CLI shows: training progress and summaries, sized for an 80-column terminal."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressBar

from captchaops.settings import Settings
from captchaops.train import TrainConfig, TrainResult, train


def train_with_progress(config: TrainConfig, settings: Settings, console: Console) -> TrainResult:
    """`train` with a rich progress bar showing the stage and the latest validation metrics."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
    )
    with ProgressBar(*columns, console=console, transient=False) as bar:
        task = bar.add_task("starting", total=1.0, metrics="")

        def report(stage: str, fraction: float, metrics: dict[str, float]) -> None:
            shown = "  ".join(
                f"{k} {metrics[k]:.3f}" for k in ("loss", "val_seq_acc", "val_cer") if k in metrics
            )
            bar.update(task, description=stage, completed=fraction, metrics=shown)

        return train(config, settings, progress=report)


def print_summary(result: TrainResult, console: Console) -> None:
    """A few lines: metrics, the registered version and whether it was staged."""
    m = result.metrics
    console.print(
        f"test sequence accuracy {m['test_seq_acc']:.4f}, CER {m['test_cer']:.4f}, "
        f"{m['epochs_run']:.0f} epochs in {m['wall_seconds']:.0f}s",
        highlight=False,
    )
    if result.skipped != "none":
        console.print(f"skipped files: {result.skipped}", highlight=False)
    if result.frozen:
        console.print(result.frozen, highlight=False)
    console.print(f"run {result.run_id}; registered {result.model_uri}", highlight=False)
    if result.staged:
        console.print("alias staging -> this version", highlight=False)
    else:
        console.print(f"not staged: {result.rejection_reason}", highlight=False)
    if result.warning:
        console.print(f"[yellow]warning:[/yellow] {result.warning}", highlight=False)
