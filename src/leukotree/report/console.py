"""Human-readable console output (rich). User text (paths, labels, patient ids) is always
escaped, so a file name such as ``[bold]x.png`` prints as it is and never as markup."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # annotations only: the CLI imports this module before any data module
    from leukotree.data.check import CheckReport
    from leukotree.data.splits import SplitPlan
    from leukotree.evaluation.confound import ColourConfound
    from leukotree.taxonomy import Taxonomy


def stderr_console() -> Console:
    """The console for messages and progress (stdout stays for results)."""
    return Console(stderr=True, soft_wrap=True)


def stdout_console() -> Console:
    """The console for results; long lines are not wrapped (paths stay whole)."""
    return Console(soft_wrap=True)


def say(console: Console, text: str, style: str | None = None) -> None:
    """Print ``text`` exactly as written (no markup, no highlighting, no wrapping inside
    words), in ``style``."""
    console.print(Text(text, style=style or ""), highlight=False, soft_wrap=True)


def print_error(console: Console, message: str) -> None:
    """``error: <message>`` with the message printed literally."""
    console.print(Text.assemble(("error: ", "bold red"), message), highlight=False,
                  soft_wrap=True)

_MAX_ROWS = 15


def _listing(console: Console, title: str, rows: list[Any], fmt: Any, style: str) -> None:
    if not rows:
        return
    console.print(f"[{style}]{escape(title)} ({len(rows)})[/]")
    for row in rows[:_MAX_ROWS]:
        say(console, f"  - {fmt(row)}")
    if len(rows) > _MAX_ROWS:
        console.print(f"  ... and {len(rows) - _MAX_ROWS} more (see --json)")


def print_check_report(report: CheckReport, taxonomy: Taxonomy, console: Console) -> None:
    """Counts per class and patient, then every problem found, then the verdict."""
    table = Table(title=escape(f"{report.source} - taxonomy '{report.taxonomy}'"))
    table.add_column("class (path)")
    table.add_column("level", justify="right")
    table.add_column("images", justify="right")
    table.add_column("patients", justify="right")
    for node in taxonomy.nodes:
        row = report.per_class.get(node)
        if row is None and not taxonomy.is_leaf(node):
            continue
        kind = "" if taxonomy.is_leaf(node) else " [dim](inner-node label)[/]"
        table.add_row(
            escape(taxonomy.path_string(node)) + kind,
            str(taxonomy.depth(node)),
            str(row["images"]) if row else "[red]0[/]",
            str(row["patients"]) if row else "-",
        )
    console.print(table)
    say(console, f"images: {report.n_images} listed, {report.n_readable} readable; "
        f"patients: {len(report.per_patient)} (ids from: {report.patient_source})")
    if report.grouping_note:
        say(console, report.grouping_note, "bold yellow")
    if report.leaves_without_images:
        missing = ", ".join(report.leaves_without_images)
        console.print(f"[yellow]leaves without images:[/] {escape(missing)}")
    fatal = [p for p in report.problems if p["fatal"]]
    minor = [p for p in report.problems if not p["fatal"]]
    _listing(console, "errors", fatal, lambda p: f"{p['where']}: {p['message']}", "bold red")
    _listing(console, "unreadable images", report.unreadable,
             lambda r: f"{r['path']}: {r['reason']}", "bold red")
    _listing(console, "warnings", minor, lambda p: f"{p['where']}: {p['message']}", "yellow")
    _listing(console, "exact duplicates (same bytes)", report.exact_duplicates,
             lambda d: " = ".join(d["paths"]) + _dup_flags(d), "yellow")
    _listing(console, f"near duplicates (pHash distance <= "
             f"{report.settings['near_duplicate_distance']})", report.near_duplicates,
             lambda d: " ~ ".join(d["paths"]) + f" (distance {d['distance']})" + _dup_flags(d),
             "yellow")
    _listing(console, f"images smaller than {report.settings['min_size']} px",
             report.small_images, lambda r: f"{r['path']}: {r['width']}x{r['height']}", "yellow")
    _listing(console, f"patients with fewer than {report.settings['min_images_per_patient']} "
             "images", report.small_patients, lambda r: f"{r['patient']}: {r['images']}",
             "yellow")
    if report.ignored_files:
        _listing(console, "files ignored (not images)", report.ignored_files, str, "dim")
    verdict = ("[bold green]usable[/]" if report.usable
               else "[bold red]NOT usable as is: fix the errors above[/]")
    console.print(f"verdict: {verdict}; {report.warnings} warning(s)")


def _dup_flags(entry: dict[str, Any]) -> str:
    flags = []
    if entry["conflicting_labels"]:
        flags.append("CONFLICTING LABELS " + "/".join(entry["labels"]))
    if entry["across_groups"]:
        flags.append("across patients: leaks between folds")
    return f" [{'; '.join(flags)}]" if flags else ""


def print_split_plan(plan: SplitPlan, console: Console) -> None:
    """Per fold (or part): images, groups and images per class."""
    rows = plan.table()
    labels = sorted({k for row in rows.values() for k in row} - {"images", "groups"})
    table = Table(title="split (rows: counts; columns: parts)")
    table.add_column("")
    for name in rows:
        table.add_column(escape(name), justify="right")
    for key in ["images", "groups", *labels]:
        table.add_row(escape(key), *(str(row.get(key, 0)) for row in rows.values()),
                      end_section=key == "groups")
    console.print(table)
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    dropped = plan.filtered.summary()
    if dropped:
        console.print("[yellow]dropped by filters:[/] " + escape(", ".join(
            f"{k}: {v}" for k, v in sorted(dropped.items()))))


def print_colour_confound(found: ColourConfound, console: Console) -> None:
    """The per-label mean colour features, what they tell apart, and the verdict."""
    what = f"features '{found.features}'" + (
        f", stain_norm '{found.stain_norm}'" if found.stain_norm != "none" else "") + (
        f", cell types {', '.join(found.cell_types)}" if found.cell_types else "")
    table = Table(title=escape(f"Colours per label ({what}): mean over the patients"))
    names = list(next(iter(found.by_label.values()), {}))
    table.add_column("label")
    for name in names:
        table.add_column(escape(name), justify="right")
    for label, values in found.by_label.items():
        table.add_row(escape(label), *(f"{values[n]:.2f}" for n in names))
    console.print(table)
    sep = found.separability
    if sep.get("auroc") is not None:
        say(console, f"{found.n_images} images of {found.n_patients} patients; out-of-fold "
                     f"AUROC of the colours alone {sep['auroc']:.3f} (min "
                     f"{sep['auroc_min']:.3f}, max {sep['auroc_max']:.3f} over "
                     f"{sep['repeats']} repeats of {sep['folds']}-fold logistic regression)")
    if found.other_cell_types:
        say(console, f"{found.other_cell_types} images of other cell types left out "
                     "(--cell-types)")
    if found.no_cell_type:
        say(console, f"{found.no_cell_type} images without a cell type left out "
                     "(--cell-types)", "yellow")
    if found.unreadable:
        _listing(console, "unreadable image(s) left out",
                 found.unreadable, str, "yellow")
    say(console, found.verdict, "bold yellow" if found.informative else "green")
