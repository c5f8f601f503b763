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


def test_images_by_path_when_the_image_column_is_absent_or_null(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    for i, _ in enumerate(PAIRS):
        (tmp_path / "images" / f"{i}.png").write_bytes(png((i, 2, 3)))
    path = tmp_path / "paths.parquet"
    pq.write_table(_drop_column(rlaifv_table(preference_rows(PAIRS)), "image"), path)
    assert [r.image for r in read_preferences(path)] == [png((i, 2, 3)) for i in range(len(PAIRS))]
    lines = [{"id": None, "image": None, "image_path": f"images/{i}.png", "question": "q", "chosen": c, "rejected": r}
             for i, (c, r) in enumerate(PAIRS)]  # fmt: skip
    jsonl = tmp_path / "nulls.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows = read_preferences(jsonl)
    assert [r.image for r in rows] == [png((i, 2, 3)) for i in range(len(PAIRS))]
    assert len({r.id for r in rows}) == len(PAIRS) and "None" not in {r.id for r in rows}  # a null id is none


def test_images_as_base64_text_of_any_length_and_bad_ones_say_why(tmp_path: Path) -> None:
    import base64
    import io

    from PIL import Image

    small = png((5, 6, 7), size=1)  # a 1x1 PNG: under 100 characters of base64
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="TIFF")
    rows = preference_rows(PAIRS)
    rows[0]["image"] = {"bytes": None, "path": base64.b64encode(small).decode()}
    rows[1]["image"] = {"bytes": None, "path": base64.b64encode(png((1, 2, 3), size=64)).decode()}  # > 255 chars
    rows[1]["image_path"] = None
    rows[2]["image"] = {"bytes": None, "path": "data:image/png;base64," + base64.b64encode(small).decode()}
    read = read_preferences(write_rlaifv_parquet(tmp_path / "b64.parquet", rows))
    assert [r.image for r in read] == [small, png((1, 2, 3), size=64), small]
    rows[0]["image"] = {"bytes": None, "path": base64.b64encode(buffer.getvalue()).decode()}
    with pytest.raises(ImageDecodeError, match="TIFF is not allowed") as info:
        read_preferences(write_rlaifv_parquet(tmp_path / "tiff.parquet", rows))
    assert len(str(info.value)) < 500


def test_jsonl_with_a_byte_order_mark_reads_and_non_utf8_is_named(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png((9, 9, 9)))
    line = json.dumps({"id": "q1", "image": "a.png", "question": "what", "chosen": "a cat", "rejected": "a dog"})
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\n")
    assert read_preferences(tmp_path / "bom.jsonl")[0].id == "q1"
    (tmp_path / "latin1.jsonl").write_bytes(line.replace("a cat", "caf\u00e9").encode("latin-1") + b"\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_preferences(tmp_path / "latin1.jsonl")
    upper = write_rlaifv_parquet(tmp_path / "TRAIN.PARQUET", preference_rows(PAIRS))
    assert len(read_preferences(upper)) == len(PAIRS)


def _drop_column(table: pa.Table, name: str) -> pa.Table:
    return table.drop_columns([name])


@pytest.mark.parametrize("column", ["image", "question", "chosen", "rejected"])
def test_missing_column_is_named(tmp_path: Path, column: str) -> None:
    path = tmp_path / "bad.parquet"
    table = _drop_column(rlaifv_table(preference_rows(PAIRS)), column)
    if column == "image":  # image_path alone would do (next test)
        table = _drop_column(table, "image_path")
    pq.write_table(table, path)
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
    with pytest.raises(DataError, match=r"no \.parquet or \.parq or \.jsonl files"):
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
