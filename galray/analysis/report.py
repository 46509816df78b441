"""The HTML report: one self-contained file, pictures first, built from an analysis folder.

`galray analyze` writes a folder (:data:`SUMMARY_NAME`, ``figures/*.png``, ``*.parquet`` tables,
``galleries.parquet`` of thumbnails); :func:`load_inputs` reads it and :func:`render_report` turns it
into one HTML page with every PNG embedded as a data URI, so the file can be mailed, opened offline
or logged to MLflow as a single artifact.

The page is a list of sections, each made by a *section builder*: a function
``(ReportInputs) -> Section | None`` (None when its data is absent, e.g. no VQ-VAE was analysed).
:data:`SECTIONS` is the default order: headline figures, galleries, PCA extremes, similar galaxies
and linear probes, novel features, families, codebook, generations, then the tables and the run's
configuration and metrics. Another
analysis adds its own builder (reading its own files from ``inputs.folder``) and passes
``sections=SECTIONS + (my_builder,)``, or inserts it where it belongs.

Large galleries stay responsive: cutouts are small PNG thumbnails (a few kB) drawn at a fixed size,
and every image below the first screen has ``loading="lazy"``, so the browser decodes them only as
they scroll into view. Pure Python + pandas: no torch, no Ray.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

SUMMARY_NAME = "analysis.json"
ANALYSIS_ARTIFACTS = "analysis"  # where `galray analyze` logs the folder in its MLflow run
FIGURES_DIR = "figures"
GALLERIES_NAME = "galleries.parquet"
THUMB_PX = 72  # displayed size of a gallery thumbnail (CSS pixels)


@dataclass
class ReportInputs:
    """Everything an analysis folder holds, read once."""

    folder: Path
    """The analysis folder (local), for builders that read files of their own."""
    summary: dict[str, Any]
    """analysis.json: headline metrics, the job's config, provenance, what each section found."""
    figures: dict[str, bytes] = field(default_factory=dict)
    """``figures/<name>.png`` bytes by name (without .png)."""
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    """``<name>.parquet`` frames by name (recovery, alignment, novel, families, ...)."""
    galleries: pd.DataFrame | None = None
    """gallery, rank, object_id, value, png: one row per thumbnail."""

    def gallery(self, name: str) -> pd.DataFrame:
        if self.galleries is None or self.galleries.empty:
            return pd.DataFrame(columns=["gallery", "rank", "object_id", "value", "png", "source"])
        return self.galleries[self.galleries["gallery"] == name].sort_values("rank")


@dataclass(frozen=True)
class Section:
    """One part of the page."""

    id: str
    """Anchor of the section (letters, digits, dashes)."""
    title: str
    body: str
    """HTML of the section's content."""


SectionBuilder = Callable[[ReportInputs], "Section | None"]


def load_inputs(folder: str | Path) -> ReportInputs:
    """Read an analysis folder written by `galray analyze`."""
    folder = Path(folder)
    summary_path = folder / SUMMARY_NAME
    if not summary_path.exists():
        raise FileNotFoundError(f"{folder} holds no {SUMMARY_NAME}: is it an analysis folder of `galray analyze`?")
    summary = json.loads(summary_path.read_text())
    figures = {p.stem: p.read_bytes() for p in sorted((folder / FIGURES_DIR).glob("*.png"))}
    tables = {p.stem: pd.read_parquet(p) for p in sorted(folder.glob("*.parquet")) if p.name != GALLERIES_NAME}
    gal = folder / GALLERIES_NAME
    return ReportInputs(folder=folder, summary=summary, figures=figures, tables=tables,
                        galleries=pd.read_parquet(gal) if gal.exists() else None)


# --- HTML pieces -----------------------------------------------------------------------------------

def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, lazy: bool = True, width: int | None = None, height: int | None = None,
        css: str = "") -> str:
    """An ``<img>`` with the PNG embedded; lazy ones are decoded only near the viewport."""
    size = (f' width="{width}"' if width else "") + (f' height="{height}"' if height else "")
    cls = f' class="{css}"' if css else ""
    load = ' loading="lazy"' if lazy else ""
    return f'<img src="{data_uri(png)}" alt="{_e(alt)}"{size}{cls}{load} decoding="async">'


def figure(inputs: ReportInputs, name: str, caption: str, lazy: bool = True) -> str:
    png = inputs.figures.get(name)
    if png is None:
        return ""
    return f'<figure>{img(png, name, lazy=lazy)}<figcaption>{caption}</figcaption></figure>'


def thumbnails(rows: pd.DataFrame, value_name: str = "activation") -> str:
    """A strip of gallery thumbnails; hovering one shows its object_id and value. A thumbnail from another
    store than the analysed one (its ``source``, e.g. real XDF galaxies) carries that name as a caption."""
    cells = []
    for r in rows.itertuples():
        source = str(getattr(r, "source", "") or "")  # analyses made before sources existed have none
        tip = f"{r.object_id}  {value_name} {r.value:.3g}" + (f"  ({source})" if source else "")
        badge = f'<span class="src">{_e(source)}</span>' if source else ""
        cells.append(f'<a class="thumb" title="{_e(tip)}">'
                     f'{img(bytes(r.png), str(r.object_id), width=THUMB_PX, height=THUMB_PX)}{badge}</a>')
    return f'<div class="strip">{"".join(cells)}</div>' if cells else '<p class="muted">no cutouts</p>'


def table(frame: pd.DataFrame, columns: Sequence[str] | None = None, max_rows: int = 50, digits: int = 3) -> str:
    if frame is None or frame.empty:
        return '<p class="muted">empty</p>'
    shown = frame[list(columns)] if columns else frame
    shown = shown.head(max_rows)
    return shown.to_html(index=False, classes="tbl", border=0, float_format=lambda v: f"{v:.{digits}f}",
                         escape=True)


def _card(title: str, subtitle: str, body: str) -> str:
    return (f'<div class="card"><div class="card-h"><b>{_e(title)}</b> <span class="muted">{subtitle}</span></div>'
            f'{body}</div>')


def _correlations(inputs: ReportInputs, method: str, feature: int, n: int = 3) -> str:
    """The labels a feature correlates with most, as a short line."""
    top = inputs.summary.get("top_labels", {}).get(f"{method} {feature}", [])[:n]
    return ", ".join(f"{_e(lbl)} {rho:+.2f}" for lbl, rho in top)


# --- section builders ------------------------------------------------------------------------------

def headline(inputs: ReportInputs) -> Section | None:
    s = inputs.summary
    h = s.get("headline", {})
    stats = "".join(f'<div class="stat"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
                    for k, v in h.items())
    body = (f'<div class="stats">{stats}</div>'
            + figure(inputs, "recovery", "Best |Spearman rho| of one SAE feature, and of one of as many PCA "
                     "components, with each generating parameter of the simulation (or catalog label). Dotted: "
                     "99% of the label-shuffle null; dashed: the 0.7 goal.", lazy=False)
            + figure(inputs, "distributions", "Each feature's best |rho| over all labels: SAE features (most "
                     "frequent first, as many as requested), PCA components, and SAE features against shuffled "
                     "labels (chance).", lazy=False))
    if "recovery" not in inputs.figures and not h:
        return None
    return Section("headline", "At a glance", body)


def galleries(inputs: ReportInputs) -> Section | None:
    chosen = inputs.summary.get("gallery_features", [])
    if not chosen:
        return None
    cards = []
    for item in chosen:
        f = int(item["feature"])
        rows = inputs.gallery(f"sae {f}")
        counts = rows["source"].value_counts() if "source" in rows else pd.Series(dtype=int)
        sub = (f'{_e(item.get("why", ""))} · fires on {100 * item.get("frequency", 0):.1f}% · '
               f'{_correlations(inputs, "sae", f)}'
               + "".join(f" · {n} of {len(rows)} from {_e(k)}" for k, n in counts.items() if k))
        cards.append(_card(f"SAE feature {f}", sub, thumbnails(rows)))
    others = {k: v for k, v in inputs.summary.get("gallery_sources", {}).items() if k}
    intro = ""
    if others:
        names = ", ".join(f"<b>{_e(k)}</b> ({_e(v)})" for k, v in others.items())
        intro = (f'<p>Each gallery holds the most activating objects of {_e(inputs.summary["gallery_sources"][""])} '
                 f'and of {names} together, by activation; a caption marks those from {", ".join(map(_e, others))}. '
                 f'Those objects have no ground truth: by design, the alignment with the labels (above) and PCA '
                 f'(below) use only the rows of the analysed store.</p>')
    return Section("galleries", "What the SAE features pick: top-activating galaxies", intro + "".join(cards)
                   + figure(inputs, "rho_heatmap", "Signed Spearman rho of these features with every label."))


def pca_extremes(inputs: ReportInputs) -> Section | None:
    comps = inputs.summary.get("pca_gallery", [])
    if not comps:
        return None
    cards = []
    for item in comps:
        c = int(item["component"])
        sub = f'explains {100 * item.get("explained", 0):.1f}% of the variance · {_correlations(inputs, "pca", c)}'
        body = ('<div class="pair"><div><div class="muted">lowest</div>'
                + thumbnails(inputs.gallery(f"pc {c} low"), "score")
                + '</div><div><div class="muted">highest</div>' + thumbnails(inputs.gallery(f"pc {c} high"), "score")
                + "</div></div>")
        cards.append(_card(f"PCA component {c}", sub, body))
    return Section("pca", "PCA components at both extremes", "".join(cards))


def similar_galaxies(inputs: ReportInputs) -> Section | None:
    """A few galaxies with their nearest neighbours (cosine of embeddings), beside the linear-probe table."""
    queries = inputs.summary.get("neighbour_galleries", [])
    probes = inputs.tables.get("probes")
    if not queries and probes is None:
        return None
    cards = []
    for item in queries:
        rows = inputs.gallery(item["gallery"])
        query = rows[(rows["rank"] == 0) & (rows["object_id"] == item["query"])]
        near = rows.drop(query.index)
        sims = near["value"]
        sub = (f"cosine similarity {sims.max():.3f} to {sims.min():.3f}" if len(sims) else "no neighbours shown")
        body = ('<div class="pair nn"><div><div class="muted">query</div>' + thumbnails(query, "similarity")
                + '</div><div><div class="muted">nearest, most similar first</div>' + thumbnails(near, "similarity")
                + "</div></div>")
        cards.append(_card(f"like {item['query']}", sub, body))
    intro = ('<p>Each galaxy beside the analysed objects whose embeddings point most nearly the same way (cosine '
             'similarity; <code>galray neighbours</code> searches a whole store the same way).</p>') if cards else ""
    probe_html = ""
    if probes is not None:
        probe_html = ('<h3>Linear probes: how much of each label a linear read-out recovers</h3>'
                      f'<p class="muted">Out-of-fold (5-fold) ROC AUC for two-valued labels (0.5: chance) and R² for '
                      f'the rest (0: no better than the mean), of the embeddings, on the first '
                      f'{int(probes["objects"].max())} analysed objects with the label.</p>'
                      + table(probes, ["label", "metric", "objects", "embedding"], max_rows=200))
    return Section("neighbours", "Similar galaxies and linear probes", intro + "".join(cards) + probe_html)


def novel(inputs: ReportInputs) -> Section | None:
    frame = inputs.tables.get("novel")
    if frame is None:
        return None
    cards = []
    for r in frame.head(int(inputs.summary.get("novel_shown", 6))).itertuples():
        sub = (f"fires on {100 * r.frequency:.1f}% · held-out R² from all labels {r.r2_labels:.2f} · "
               f"best label {_e(r.best_label)} {r.rho:+.2f}")
        cards.append(_card(f"SAE feature {int(r.feature)}", sub, thumbnails(inputs.gallery(f"sae {int(r.feature)}"))))
    intro = ('<p>Frequent features that a linear regression on every label explains poorly (R² on held-out '
             'folds): candidates for structure the catalog does not describe.</p>')
    return Section("novel", "Novel features", intro + ("".join(cards) or '<p class="muted">none found</p>'))


def families(inputs: ReportInputs) -> Section | None:
    frame = inputs.tables.get("families")
    if frame is None:
        return None
    info = inputs.summary.get("families", {})
    intro = (f'<p>{_e(info.get("narrow", ""))}: children of the wide SAE matched to a parent of the narrow one by '
             f'decoder cosine ≥ {info.get("min_cosine", "")} or co-occurrence P(parent | child) ≥ '
             f'{info.get("min_cooccurrence", "")} (O\'Neill et al. 2024).</p>')
    cards = []
    for parent, group in list(frame.groupby("parent", sort=False))[: int(info.get("shown", 4))]:
        body = thumbnails(inputs.gallery(f"sae {int(parent)}")) if info.get("parents_in_store", True) else ""
        for r in group.head(3).itertuples():
            body += (f'<div class="child">child {int(r.child)} · cosine {r.cosine:.2f} · '
                     f'P(parent | child) {r.cooccurrence:.2f}</div>' + thumbnails(inputs.gallery(f"sae {int(r.child)}")))
        cards.append(_card(f"family of SAE feature {int(parent)}", f"{len(group)} children", body))
    return Section("families", "Feature families", intro + ("".join(cards) or '<p class="muted">no families</p>'))


def codebook(inputs: ReportInputs) -> Section | None:
    names = ("codebook_usage", "codebook_top", "codebook_bottom", "codebook_heatmaps", "codebook_tsne")
    if not any(n in inputs.figures for n in names):
        return None
    cb = inputs.summary.get("codebook", {})
    stats = "".join(f'<div class="stat"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
                    for k, v in cb.items())
    body = (f'<div class="stats">{stats}</div>'
            + figure(inputs, "codebook_usage", "Tokens per code (histogram) and the share of tokens held by the "
                     "most used codes (CDF).")
            + figure(inputs, "codebook_top", "The most used codes, each decoded from a grid filled with it.")
            + figure(inputs, "codebook_bottom", "The least used codes (among those used).")
            + figure(inputs, "codebook_heatmaps", "Where the most used codes sit in the grid (share of images).")
            + figure(inputs, "codebook_tsne", "t-SNE of each image's pooled quantized latent, coloured by class."))
    return Section("codebook", "The VQ-VAE codebook", body)


def generations(inputs: ReportInputs) -> Section | None:
    shown = [n for n in inputs.figures if n.startswith("generated_")]
    if not shown:
        return None
    labels = inputs.summary.get("generations", {})
    body = "".join(figure(inputs, n, _e(labels.get(n, n))) for n in sorted(shown))
    return Section("generations", "What the prior generates", body)


def tables(inputs: ReportInputs) -> Section | None:
    parts = []
    if "recovery" in inputs.tables:
        parts.append("<h3>Per label: the best SAE feature and the best PCA component</h3>"
                     + table(inputs.tables["recovery"], max_rows=200))
    if "alignment" in inputs.tables:
        parts.append("<h3>Most aligned features</h3>" + table(
            inputs.tables["alignment"], ["method", "feature", "frequency", "max_abs_rho", "best_label", "rho",
                                         "above_null"], max_rows=40))
    if "novel" in inputs.tables:
        parts.append("<h3>Novel features</h3>" + table(
            inputs.tables["novel"], ["feature", "frequency", "r2_labels", "max_abs_rho", "best_label"], max_rows=40))
    if "families" in inputs.tables:
        parts.append("<h3>Families</h3>" + table(inputs.tables["families"], max_rows=60))
    return Section("tables", "Tables", "".join(parts)) if parts else None


def run_info(inputs: ReportInputs) -> Section | None:
    s = inputs.summary
    blocks = []
    for key, title in (("metrics", "Metrics"), ("config", "Analysis settings"), ("provenance", "Inputs"),
                       ("sae_config", "SAE"), ("sae_training", "SAE training run")):
        if s.get(key):
            blocks.append(f'<details{" open" if key == "metrics" else ""}><summary>{title}</summary>'
                          f'<pre>{_e(json.dumps(s[key], indent=2, sort_keys=True, default=str))}</pre></details>')
    return Section("run", "Run: configuration and metrics", "".join(blocks)) if blocks else None


SECTIONS: tuple[SectionBuilder, ...] = (headline, galleries, pca_extremes, similar_galaxies, novel, families, codebook,
                                        generations, tables, run_info)

STYLE = """
:root{--fg:#1d2330;--muted:#6b7280;--line:#e5e7eb;--bg:#fafafa;--accent:#d1495b}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{background:#111827;color:#f9fafb;padding:18px 28px}header h1{margin:0;font-size:22px}header p{margin:4px 0 0;color:#cbd5e1}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid var(--line);padding:8px 28px;z-index:2}
nav a{margin-right:16px;color:var(--fg);text-decoration:none;font-weight:500}nav a:hover{color:var(--accent)}
main{max-width:1180px;margin:0 auto;padding:8px 28px 48px}section{margin-top:26px}
h2{font-size:19px;border-bottom:2px solid var(--accent);display:inline-block;padding-bottom:2px}h3{font-size:15px;margin:18px 0 6px}
figure{margin:14px 0;background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}figcaption{color:var(--muted);font-size:12.5px;margin-top:6px}
.stats{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}.stat{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px 14px;min-width:120px}
.stat .v{font-size:18px;font-weight:600}.stat .k{color:var(--muted);font-size:12px}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 12px;margin:10px 0}
.card-h{margin-bottom:6px}.muted{color:var(--muted);font-size:12.5px}.child{margin:8px 0 2px;font-size:12.5px;color:var(--muted)}
.strip{display:flex;flex-wrap:wrap;gap:3px}.thumb{position:relative}.thumb img{display:block;width:72px;height:72px;image-rendering:pixelated;border-radius:3px;background:#000}
.src{position:absolute;left:2px;bottom:2px;background:var(--accent);color:#fff;font-size:10px;font-weight:600;padding:0 3px;border-radius:2px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:14px}
.tbl{border-collapse:collapse;font-size:12.5px;background:#fff}.tbl th,.tbl td{border-bottom:1px solid var(--line);padding:3px 8px;text-align:right}
.tbl th{background:#f3f4f6}.tbl td:first-child,.tbl th:first-child{text-align:left}
details{background:#fff;border:1px solid var(--line);border-radius:8px;padding:6px 12px;margin:8px 0}pre{font-size:12px;overflow:auto}
"""


def build_sections(inputs: ReportInputs, sections: Sequence[SectionBuilder] = SECTIONS) -> list[Section]:
    """The sections whose data the analysis holds, in order (a builder returning None is left out)."""
    return [s for s in (b(inputs) for b in sections) if s is not None]


def page(inputs: ReportInputs, built: Sequence[Section], title: str = "") -> str:
    """The whole page as one HTML string."""
    s = inputs.summary
    title = title or s.get("title") or "galray analysis"
    subtitle = _e(s.get("subtitle", ""))
    nav = "".join(f'<a href="#{_e(x.id)}">{_e(x.title.split(":")[0])}</a>' for x in built)
    body = "".join(f'<section id="{_e(x.id)}"><h2>{_e(x.title)}</h2>{x.body}</section>' for x in built)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{_e(title)}</title>'
            f'<style>{STYLE}</style></head><body><header><h1>{_e(title)}</h1><p>{subtitle}</p></header>'
            f'<nav>{nav}</nav><main>{body}</main></body></html>')


def render_report(inputs: ReportInputs, sections: Sequence[SectionBuilder] = SECTIONS, title: str = "") -> str:
    """:func:`page` of :func:`build_sections`."""
    return page(inputs, build_sections(inputs, sections), title)
