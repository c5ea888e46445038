"""The docs that are generated from code stay equal to it."""
from pathlib import Path

from nsa_parallel.arguments import markdown_table

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_arguments_doc_lists_every_nsa_flag():
    assert markdown_table() in (DOCS / "arguments.md").read_text()
