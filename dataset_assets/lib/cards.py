"""The dataset card a verified download writes (see ``core.select.card``), made from the index
(release, citations) and the selection its manifest carries."""

from collections.abc import Callable
from pathlib import Path

from dataset_assets.lib.resources import IdcResource


def card_writer(idc: IdcResource, name: str, kind: str) -> Callable:
    """``write(manifest, root, s5cmd_version) -> (markdown path, card)`` for a download named ``name``."""

    def write(manifest, root: Path, s5cmd_version: str | None):
        from importlib.metadata import version

        from dataset_assets.core.index.citations import citations
        from dataset_assets.core.index.source import release_of
        from dataset_assets.core.select.card import dataset_card, selection_of, write_card

        source = idc.source()
        with source.connect() as con:
            release = release_of(con)
            cited = citations(con, manifest, analysis_results=source.directory / "analysis_results_index.parquet")
        card = dataset_card(
            manifest,
            name=name,
            kind=kind,
            release=release,
            selection=selection_of(manifest),
            citations=cited,
            tool_version=version("dataset_assets"),
            s5cmd_version=s5cmd_version,
            root=root,
        )
        markdown, _ = write_card(root, card)
        return markdown, card

    return write
