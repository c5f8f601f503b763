"""Reading RLAIF-V-Dataset parquet and JSONL, and the errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trainer_testkit import png, preference_rows, rlaifv_table, write_rlaifv_parquet

from rlaifv.trainer.data import (
    ListPromptSource,
    PromptItem,
    PromptSource,
    read_preferences,
    read_prompts,
    write_preferences,
)
from rlaifv.trainer.errors import DataError, EmptyAnswerError, ImageDecodeError, MissingColumnError

PAIRS = [("a red circle", "a blue square"), ("a green tree", "a black dog"), ("a white cat", "a yellow car")]


def test_reads_the_exact_rlaifv_schema(tmp_path: Path) -> None:
    path = write_rlaifv_parquet(tmp_path / "train-00000.parquet", preference_rows(PAIRS))
    rows = read_preferences(path)
    assert [(r.chosen, r.rejected) for r in rows] == PAIRS
    assert rows[0].id == "0" and rows[0].question == "describe the image"
    assert rows[0].image == png((220, 30, 30))
    assert rows[0].meta["origin_split"] == {"generator": "tiny", "labeler": "tiny", "type": "detailed_description"}
    assert rows[0].meta["ds_name"] == "RLAIF-V" and rows[0].meta["image_path"] == "images/0.png"


def test_reads_a_folder_of_parquet_shards_in_order(tmp_path: Path) -> None:
    write_rlaifv_parquet(tmp_path / "data" / "b.parquet", preference_rows(PAIRS[1:]))
    write_rlaifv_parquet(tmp_path / "data" / "a.parquet", preference_rows(PAIRS[:1]))
    assert [r.chosen for r in read_preferences(tmp_path / "data")] == [p[0] for p in PAIRS]
    assert len(read_preferences(tmp_path / "data", limit=2)) == 2


def test_image_path_is_used_when_bytes_are_missing(tmp_path: Path) -> None:
    (tmp_path / "img.png").write_bytes(png((1, 2, 3)))
    rows = preference_rows(PAIRS[:1])
    rows[0]["image"] = {"bytes": None, "path": "img.png"}
    rows_read = read_preferences(write_rlaifv_parquet(tmp_path / "x.parquet", rows))
    assert rows_read[0].image == png((1, 2, 3))


def test_jsonl_with_image_paths(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png((9, 9, 9)))
    lines = [{"id": "q1", "image": "imgs/a.png", "question": "what is this", "chosen": "a cat", "rejected": "a dog"}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rows = read_preferences(path)
    assert rows[0].id == "q1" and rows[0].image == png((9, 9, 9)) and rows[0].chosen == "a cat"
    prompts = read_prompts(path)
    assert prompts == [PromptItem("q1", png((9, 9, 9)), "what is this")]


def test_write_preferences_round_trips_in_the_same_schema(tmp_path: Path) -> None:
    rows = read_preferences(write_rlaifv_parquet(tmp_path / "in.parquet", preference_rows(PAIRS)))
    out = write_preferences(tmp_path / "out.parquet", rows, origin={"generator": "g", "labeler": "l", "type": "t"})
    assert pq.read_schema(out).names == rlaifv_table(preference_rows(PAIRS)).schema.names
    again = read_preferences(out)
    assert [(r.id, r.image, r.question, r.chosen, r.rejected) for r in again] == [
        (r.id, r.image, r.question, r.chosen, r.rejected) for r in rows
    ]
    assert again[0].meta["origin_split"] == {"generator": "g", "labeler": "l", "type": "t"}


def _drop_column(table: pa.Table, name: str) -> pa.Table:
    return table.drop_columns([name])


@pytest.mark.parametrize("column", ["image", "question", "chosen", "rejected"])
def test_missing_column_is_named(tmp_path: Path, column: str) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(_drop_column(rlaifv_table(preference_rows(PAIRS)), column), path)
    with pytest.raises(MissingColumnError, match=f"column '{column}'") as info:
        read_preferences(path)
    assert info.value.column == column and str(path) in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "error", "column"),
    [
        ("chosen", "", EmptyAnswerError, "chosen"),
        ("rejected", "   ", EmptyAnswerError, "rejected"),
        ("question", None, EmptyAnswerError, "question"),
        ("image", {"bytes": b"not an image at all", "path": "x.png"}, ImageDecodeError, "image"),
        ("image", {"bytes": png((1, 1, 1))[:40], "path": "x.png"}, ImageDecodeError, "image"),
        ("image", {"bytes": None, "path": "missing.png"}, ImageDecodeError, "image"),
    ],
)
def test_bad_row_is_named_by_row_and_column(tmp_path: Path, field: str, value, error: type, column: str) -> None:
    rows = preference_rows(PAIRS)
    rows[2][field] = value
    path = write_rlaifv_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(error) as info:
        read_preferences(path)
    assert info.value.row == 2 and info.value.column == column
    assert f"row 2, column '{column}'" in str(info.value)


def test_jsonl_errors_name_the_row(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"image": "a.png", "question": "q", "chosen": "a"}\n')
    with pytest.raises(MissingColumnError, match="row 0, column 'rejected'"):
        read_preferences(path)
    path.write_text("{not json\n")
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        read_preferences(path)


def test_not_a_parquet_file_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_preferences(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="no such file or folder"):
        read_preferences(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.parquet or \.jsonl files"):
        read_preferences(tmp_path / "empty")


def test_list_prompt_source_gives_disjoint_reproducible_rounds() -> None:
    items = [PromptItem(str(i), png((i, i, i)), f"question {i}") for i in range(10)]
    source = ListPromptSource(items)
    assert isinstance(source, PromptSource)
    first, second = source.prompts(0, 4, seed=3), source.prompts(1, 4, seed=3)
    assert first == source.prompts(0, 4, seed=3)
    assert not {p.id for p in first} & {p.id for p in second}
    assert len(source.prompts(5, 4, seed=3)) == 4  # wraps around when the list runs out
    assert len(source.prompts(0, 50, seed=3)) == 10


def test_read_prompts_deduplicates_rlaifv_rows(tmp_path: Path) -> None:
    rows = preference_rows(PAIRS) + preference_rows(PAIRS[:1])  # the last row repeats image+question of row 0
    prompts = read_prompts(write_rlaifv_parquet(tmp_path / "p.parquet", rows))
    assert len(prompts) == 3
