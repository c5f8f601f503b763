"""Reading RLAIF-V-Dataset parquet and JSONL, and the errors for bad files."""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trainer_testkit import COLOURS, png, preference_rows, rlaifv_table, write_rlaifv_parquet

from rlaifv.trainer.data import (
    ListPromptSource,
    PromptItem,
    PromptSource,
    read_preferences,
    read_prompts,
    write_preferences,
)
from rlaifv.trainer.errors import ConfigError, DataError, EmptyAnswerError, ImageDecodeError, MissingColumnError

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


def test_a_json_file_holding_an_array_of_records(tmp_path: Path) -> None:
    """LLaVA-style datasets ship one JSON array; its items are rows, numbered from 0, errors naming them."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png((9, 9, 9)))
    records = [
        {"id": "q1", "image": "imgs/a.png", "question": "what is this", "chosen": "a cat", "rejected": "a dog"},
        {"id": "q2", "image": "imgs/a.png", "question": "and this", "chosen": "a hat", "rejected": "a bat"},
    ]
    path = tmp_path / "prefs.json"
    path.write_text("\ufeff\n  " + json.dumps(records, indent=2))
    rows = read_preferences(path)
    assert [(r.id, r.chosen) for r in rows] == [("q1", "a cat"), ("q2", "a hat")] and rows[1].image == png((9, 9, 9))
    assert [p.question for p in read_prompts(path)] == ["what is this", "and this"]

    del records[1]["rejected"]
    path.write_text(json.dumps(records))
    with pytest.raises(MissingColumnError, match=r"row 1, column 'rejected': required field is missing \(item 1 of"):
        read_preferences(path)
    path.write_text(json.dumps([records[0], "text"]))
    with pytest.raises(DataError, match="row 1: item 1 of the array is not a JSON object"):
        read_preferences(path)
    path.write_text('[{"id": 1,\n "image": ]')
    with pytest.raises(DataError, match=r"not valid JSON \(line 2\)"):
        read_preferences(path)
    (tmp_path / "meta.json").write_text('{"features": {}}')  # a folder's JSON files are metadata, not data
    (tmp_path / "prefs.json").unlink()
    with pytest.raises(DataError, match=r"no \.parquet or \.parq or \.jsonl files in folder"):
        read_preferences(tmp_path)


def test_llava_format_conversations_are_prompts_of_their_first_human_turn(tmp_path: Path) -> None:
    """LLaVA's instruction data (`llava_v1_5_mix665k.json` and the like): `conversations` alternate human and
    gpt turns; the first human turn is the prompt (its `<image>` placeholder goes when the prompt is encoded)."""
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "a.png").write_bytes(png((9, 9, 9)))
    records = [
        {
            "id": "000000033471",
            "image": "coco/a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
                {"from": "gpt", "value": "The bus in the image is white and red."},
                {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                {"from": "gpt", "value": "The back of the bus features an advertisement."},
            ],
        },
        {"id": "x2", "image": "coco/a.png", "conversations": [{"role": "user", "content": "Describe it."}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    prompts = read_prompts(path)
    assert [(p.id, p.question) for p in prompts] == [
        ("000000033471", "<image>\nWhat are the colors of the bus in the image?"),
        ("x2", "Describe it."),
    ]
    records.append({"id": "t", "conversations": [{"from": "human", "value": "Tell me a joke."}]})
    path.write_text(json.dumps(records))
    with pytest.raises(MissingColumnError, match=r"row 2, column 'image': a text-only conversation.*jq"):
        read_prompts(path)
    records[2] = {"id": "t", "image": "coco/a.png", "conversations": [{"from": "gpt", "value": "Hi."}]}
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"row 2, column 'conversations': no human turn"):
        read_prompts(path)
    records[2]["conversations"] = [{"from": "human", "value": ""}]
    path.write_text(json.dumps(records))
    with pytest.raises(EmptyAnswerError, match=r"row 2, column 'conversations\[0\]': must be non-empty text"):
        read_prompts(path)


def test_formats_that_are_not_read_say_what_to_do(tmp_path: Path) -> None:
    """A CSV was reported as "line 1 is not valid JSON", a `datasets` folder as no files at all."""
    csv = tmp_path / "prefs.csv"
    csv.write_text("image,question,chosen,rejected\n")
    with pytest.raises(DataError, match=r"CSV is not read .*to_parquet"):
        read_preferences(csv)
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "data-00000-of-00001.arrow").write_bytes(b"")
    (saved / "dataset_info.json").write_text("{}")
    with pytest.raises(DataError, match=r"files in folder \(a `datasets` save_to_disk folder .*load_from_disk"):
        read_preferences(saved)


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


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_a_non_utf8_byte_deep_in_a_file_is_named_by_its_offset_line_and_row(tmp_path: Path, compressed: bool) -> None:
    """The decoder's position is within one of its chunks: a byte at 326480 was said to be at 6992, with no row."""
    import gzip

    (tmp_path / "a.png").write_bytes(png((9, 9, 9)))
    line = json.dumps({"id": "q", "image": "a.png", "question": "what", "chosen": "a cat", "rejected": "a dog"})
    text = "\n".join([line] * 2499 + ["", line.replace("a cat", "caf\u00e9")]) + "\n"
    data = text.encode("latin-1")
    offset = data.index(b"caf\xe9") + 3
    path = tmp_path / "late.jsonl"
    path.write_bytes(gzip.compress(data) if compressed else data)
    with pytest.raises(DataError, match=rf"not UTF-8 text \(byte {offset}, line 2501\)") as info:
        read_preferences(path)
    assert info.value.row == 2499  # the blank line is no row


def test_a_non_utf8_byte_is_found_within_a_line_of_megabytes_and_an_arrays_row_is_not_guessed(
    tmp_path: Path,
) -> None:
    """Read in pieces (one line may be a gigabyte); a JSON array's lines are not its rows, so none is named."""
    (tmp_path / "a.png").write_bytes(png((9, 9, 9)))
    record = {"id": "q", "image": "a.png", "question": "what " * 700_000, "chosen": "a cat", "rejected": "a dog"}
    data = (json.dumps(record) + "\n").encode() + json.dumps(record).replace("a cat", "caf\u00e9").encode("latin-1")
    (tmp_path / "long.jsonl").write_bytes(data + b"\n")
    with pytest.raises(DataError, match=rf"byte {data.index(b'caf') + 3}, line 2\)"):
        read_preferences(tmp_path / "long.jsonl")
    items = json.dumps([record, record], indent=1).replace("a cat", "caf\u00e9", 1).encode("latin-1")
    (tmp_path / "array.json").write_bytes(items)
    with pytest.raises(DataError, match="not UTF-8") as info:
        read_preferences(tmp_path / "array.json")
    assert info.value.row is None


def test_a_non_utf8_byte_after_a_character_split_by_a_read_is_placed_right(tmp_path: Path) -> None:
    """The scan reads 1 MiB at a time: a character cut by a read's end is held over, and counted from its start."""
    from rlaifv.trainer.data import _first_bad_utf8

    head = b"a" * (1024 * 1024 - 1) + "\u00e9".encode()  # its two bytes either side of the first read's end
    data = head + b"\n\nx\n" + b"\xff"
    (tmp_path / "x.jsonl").write_bytes(data)
    assert _first_bad_utf8(tmp_path / "x.jsonl") == (len(data) - 1, 4, 2)


def test_llava_records_in_jsonl_are_records_not_a_wrapper(tmp_path: Path) -> None:
    """A LLaVA record names its image `image_path` and its question in `conversations` (a list of objects): the
    wrapper hint took it for a table and refused the file."""
    (tmp_path / "a.png").write_bytes(png((9, 9, 9)))
    turns = [{"from": "human", "value": "<image>\nwhat is this"}, {"from": "gpt", "value": "a cat"}]
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "1", "image_path": "a.png", "conversations": turns}) + "\n")
    (prompt,) = read_prompts(tmp_path / "p.jsonl")
    assert prompt.question.endswith("what is this")


def test_the_whole_file_hint_reads_a_bounded_amount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound was the size on disk: 3.5 MB of gzip held 1 GB of text, all read for an error message."""
    import gzip

    from rlaifv.trainer import data

    monkeypatch.setattr(data, "_HINT_MAX_CHARS", 1000)
    text = '{\n"data": [' + ",".join(['{"a": 1}'] * 500) + "]}"
    (tmp_path / "x.json.gz").write_bytes(gzip.compress(text.encode()))
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        read_preferences(tmp_path / "x.json.gz")
    monkeypatch.setattr(data, "_HINT_MAX_CHARS", 10_000)
    with pytest.raises(DataError, match="holding its records under 'data'"):
        read_preferences(tmp_path / "x.json.gz")


@pytest.mark.parametrize(
    ("shape", "says"),
    [
        ("wrapper", "one JSON object holding its records under 'data'"),
        ("wrapper-one-line", "one JSON object holding its records under 'data'"),
        ("pandas", "pandas' default to_json"),
        ("pretty-jsonl", "JSONL holds one record per line"),
    ],
)
def test_a_json_file_that_is_a_table_not_records_says_so(tmp_path: Path, shape: str, says: str) -> None:
    """A wrapper object was "line 1 is not valid JSON", pandas' default output "no image bytes and no image path"."""
    (tmp_path / "a.png").write_bytes(png((9, 9, 9)))
    row = {"image": "a.png", "question": "what", "chosen": "a cat", "rejected": "a dog"}
    rows = [{"id": str(i), **row} for i in (0, 1)]
    text = {
        "wrapper": json.dumps({"data": rows}, indent=2),
        "wrapper-one-line": json.dumps({"data": rows}),
        "pandas": json.dumps({k: {str(i): r[k] for i, r in enumerate(rows)} for k in rows[0]}),
        "pretty-jsonl": "\n".join(json.dumps(r, indent=2) for r in rows),
    }[shape]
    (tmp_path / "x.json").write_text(text)
    with pytest.raises(DataError, match=re.escape(says)):
        read_preferences(tmp_path / "x.json")


def test_a_jsonl_file_whose_later_line_is_broken_keeps_the_lines_error(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png((9, 9, 9)))
    line = json.dumps({"id": "q", "image": "a.png", "question": "what", "chosen": "a cat", "rejected": "a dog"})
    (tmp_path / "x.jsonl").write_text(f"{line}\n{{\n")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_preferences(tmp_path / "x.jsonl")


def test_repeated_preference_rows_are_kept_with_a_warning(tmp_path: Path) -> None:
    """The same pair twice (RLAIF-V shards repeat some) trains twice; it was silent."""
    rows = preference_rows([PAIRS[0], PAIRS[1], PAIRS[0]])
    rows[2]["image"] = rows[0]["image"]
    with pytest.warns(UserWarning, match="1 rows of .* repeat an \\(image, question, chosen, rejected\\) row"):
        read = read_preferences(write_rlaifv_parquet(tmp_path / "x.parquet", rows))
    assert [r.chosen for r in read] == [PAIRS[0][0], PAIRS[1][0], PAIRS[0][0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_preferences(write_rlaifv_parquet(tmp_path / "y.parquet", preference_rows(PAIRS)))


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
        ("rejected", "\u200b", EmptyAnswerError, "rejected"),  # passed, then DPO's tokenizing refused it, no row named
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


@pytest.mark.parametrize("workers", [1, 2])
def test_jsonl_value_errors_name_the_line_past_blank_lines(tmp_path: Path, workers: int) -> None:
    """Rows are counted without blank lines (as ids are): the line is what an editor jumps to."""
    (tmp_path / "a.png").write_bytes(png((1, 2, 3)))
    good = json.dumps({"image": "a.png", "question": "q", "chosen": "c", "rejected": "r"}) + "\n"
    path = tmp_path / "p.jsonl"
    path.write_text(
        "\n" + good + "\n\n" + json.dumps({"image": "a.png", "question": "q", "chosen": "c", "rejected": ""})
    )
    with pytest.raises(EmptyAnswerError) as info:
        read_preferences(path, workers=workers)
    assert (info.value.row, info.value.line, info.value.column) == (1, 5, "rejected")
    assert f"{path}, row 1 (line 5), column 'rejected': must be non-empty text" in str(info.value)
    path.write_text(good + "\n" + json.dumps({"image": "b.png", "question": "q"}) + "\n")
    with pytest.raises(ImageDecodeError, match=r"row 1 \(line 3\), column 'image': image file b.png not found"):
        read_prompts(path, workers=workers)
    (tmp_path / "b.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageDecodeError, match=r"row 1 \(line 3\), column 'image': undecodable image"):
        read_prompts(path, workers=workers)


def test_gzip_compressed_jsonl_and_json_read_as_the_plain_files(tmp_path: Path) -> None:
    import gzip

    (tmp_path / "a.png").write_bytes(png((1, 2, 3)))
    records = [
        {"id": f"q{i}", "image": "a.png", "question": f"q{i}?", "chosen": "c", "rejected": "r"} for i in range(3)
    ]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "zipped").mkdir()
    (tmp_path / "zipped" / "a.png").write_bytes(png((1, 2, 3)))
    (tmp_path / "zipped" / "train.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "zipped" / "listed.json.gz").write_bytes(gzip.compress(json.dumps(records).encode()))
    assert read_preferences(tmp_path / "zipped") == read_preferences(plain)  # a folder: .jsonl.gz, not .json.gz
    assert read_preferences(tmp_path / "zipped" / "listed.json.gz") == read_preferences(plain)
    (tmp_path / "zipped" / "cut.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes())[:-12])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: a damaged gzip file"):
        read_preferences(tmp_path / "zipped" / "cut.jsonl.gz")


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
    with pytest.warns(UserWarning, match=r"1 rows of .*p\.parquet repeat an \(image, question\) pair: kept once"):
        prompts = read_prompts(write_rlaifv_parquet(tmp_path / "p.parquet", rows))
    assert len(prompts) == 3


# -- reading at scale: progress, checks on threads, shared images ---------------------------------


def _distinct_rows(count: int) -> list[dict]:
    """Rows whose images all differ, so that none shares a check."""
    rows = preference_rows([(f"chosen {i}", f"rejected {i}") for i in range(count)])
    for i, row in enumerate(rows):
        row["image"] = {"bytes": png((i, 255 - i, 7)), "path": f"{i}.png"}
    return rows


class _Bar:
    """Stands in for tqdm: what the reader asked for and counted."""

    def __init__(self, kwargs: dict) -> None:
        self.kwargs, self.total, self.n = kwargs, kwargs["total"], 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[_Bar]:
    made: list[_Bar] = []

    def tqdm(**kwargs) -> _Bar:
        made.append(_Bar(kwargs))
        return made[-1]

    monkeypatch.setattr("tqdm.auto.tqdm", tqdm)
    return made


def test_progress_on_or_off_reads_the_same_rows(tmp_path: Path, bars: list[_Bar]) -> None:
    write_rlaifv_parquet(tmp_path / "data" / "a.parquet", _distinct_rows(5))
    write_rlaifv_parquet(tmp_path / "data" / "b.parquet", _distinct_rows(4))
    shown, hidden = read_preferences(tmp_path / "data"), read_preferences(tmp_path / "data", progress=False)
    assert shown == hidden and len(shown) == 9
    assert bars[0].kwargs["disable"] is None and bars[1].kwargs["disable"] is True  # None: off when not a TTY
    assert (bars[0].total, bars[0].n) == (9, 9)  # parquet row counts from the metadata, before reading
    assert len(read_preferences(tmp_path / "data", limit=6)) == 6 and (bars[2].total, bars[2].n) == (6, 6)
    assert read_prompts(tmp_path / "data") == read_prompts(tmp_path / "data", progress=False)


def test_the_prompt_bar_counts_duplicates_it_skips(tmp_path: Path, bars: list[_Bar]) -> None:
    rows = preference_rows(PAIRS)
    rows.insert(1, dict(rows[0]))  # row 1 repeats row 0's image and question
    path = write_rlaifv_parquet(tmp_path / "p.parquet", rows)
    assert [p.id for p in read_prompts(path, limit=3)] == ["0", "2", "3"]
    assert (bars[0].total, bars[0].n) == (4, 4)
    jsonl = tmp_path / "p.jsonl"
    (tmp_path / "a.png").write_bytes(png((1, 2, 3)))
    jsonl.write_text("".join(json.dumps({"image": "a.png", "question": f"q{i}"}) + "\n" for i in range(3)))
    assert len(read_prompts(jsonl, limit=2)) == 2 and (bars[1].total, bars[1].n) == (2, 2)  # JSONL: the limit


@pytest.mark.parametrize("workers", [1, 4])
def test_rows_keep_file_order_with_checks_on_threads(tmp_path: Path, workers: int) -> None:
    write_rlaifv_parquet(tmp_path / "data" / "a.parquet", _distinct_rows(37))
    (tmp_path / "data" / "b.jsonl").write_text(
        "".join(
            json.dumps({"id": f"j{i}", "image": "../b.png", "question": "q", "chosen": "c", "rejected": "r"}) + "\n"
            for i in range(5)
        )
    )
    (tmp_path / "b.png").write_bytes(png((4, 5, 6)))
    rows = read_preferences(tmp_path / "data", workers=workers)
    assert [r.id for r in rows] == [str(i) for i in range(37)] + [f"j{i}" for i in range(5)]
    assert [r.image for r in rows[:37]] == [png((i, 255 - i, 7)) for i in range(37)]
    assert rows == read_preferences(tmp_path / "data", workers=1)


@pytest.mark.parametrize("workers", [1, 4])
def test_the_first_bad_row_in_file_order_fails_even_when_a_later_one_fails_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    import threading

    from rlaifv.trainer import data

    rows = _distinct_rows(40)
    rows[13]["image"] = {"bytes": b"not an image at all", "path": "x.png"}
    rows[13]["chosen"] = ""  # within a row the image is checked first
    rows[20]["rejected"] = " "
    rows[27]["image"] = {"bytes": png((1, 1, 1))[:40], "path": "y.png"}
    path = write_rlaifv_parquet(tmp_path / "bad.parquet", rows)
    later_failed, check = threading.Event(), data.check_row_image

    def ordered_check(image: bytes, *, source: str, row: int, column: str, line: int | None = None) -> None:
        if row == 13 and workers > 1:  # hold row 13 until row 27 has failed on another thread
            assert later_failed.wait(timeout=10)
        try:
            check(image, source=source, row=row, column=column)
        finally:
            if row == 27:
                later_failed.set()

    monkeypatch.setattr(data, "check_row_image", ordered_check)
    with pytest.raises(ImageDecodeError) as info:
        read_preferences(path, workers=workers)
    assert str(info.value) == f"{path}, row 13, column 'image': undecodable image: data is not a recognised image"
    assert (info.value.source, info.value.row, info.value.column) == (str(path), 13, "image")


@pytest.mark.parametrize("workers", [1, 4])
def test_a_broken_line_after_a_bad_row_comes_second_and_none_past_the_limit(tmp_path: Path, workers: int) -> None:
    (tmp_path / "a.png").write_bytes(png((1, 2, 3)))
    good = json.dumps({"image": "a.png", "question": "q", "chosen": "c", "rejected": "r"}) + "\n"
    bad = json.dumps({"image": "a.png", "question": "q", "chosen": "", "rejected": "r"}) + "\n"
    path = tmp_path / "p.jsonl"
    path.write_text(good * 3 + bad + good + "{broken\n")
    with pytest.raises(EmptyAnswerError, match=r"row 3 \(line 4\), column 'chosen'"):
        read_preferences(path, workers=workers)
    assert len(read_preferences(path, limit=3, workers=workers)) == 3  # rows read ahead never raise
    path.write_text(good + "{broken\n" + bad)
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_preferences(path, workers=workers)


def test_identical_images_are_stored_once_and_checked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlaifv.trainer import data

    checked: list[int] = []
    check = data.check_row_image

    def counting_check(image: bytes, *, source: str, row: int, column: str, line: int | None = None) -> None:
        checked.append(row)
        check(image, source=source, row=row, column=column, line=line)

    monkeypatch.setattr(data, "check_row_image", counting_check)
    rows = preference_rows(PAIRS * 4)  # six colours: rows 0-5 differ, rows 6-11 repeat them
    read = read_preferences(write_rlaifv_parquet(tmp_path / "p.parquet", rows), workers=2)
    assert sorted(checked) == list(range(6))
    assert read[0].image is read[6].image and read[0].image == png(COLOURS[0])


def test_workers_must_be_positive(tmp_path: Path) -> None:
    path = write_rlaifv_parquet(tmp_path / "p.parquet", preference_rows(PAIRS))
    with pytest.raises(ConfigError, match="workers must be at least 1"):
        read_preferences(path, workers=0)


def test_the_image_check_fails_exactly_where_a_full_decode_fails() -> None:
    """check_image decodes JPEGs at 1/8 scale; damaged files must fail it as they fail decode_image, alike."""
    import io
    import random

    import numpy as np
    from PIL import Image

    from rlaifv.reward.errors import ImageError
    from rlaifv.reward.images import ImageLimits, check_image, decode_image

    def jpeg(seed: int, **options) -> bytes:
        noise = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noise).resize((96, 72)).save(buffer, "JPEG", **options)
        return buffer.getvalue()

    def verdict(function, data: bytes, limits: ImageLimits | None = None) -> str | None:
        try:
            function(data, limits)
        except ImageError as exc:
            return exc.message
        return None

    bases = [jpeg(0, quality=90), jpeg(1, quality=80, progressive=True), jpeg(2, quality=85, subsampling=0)]
    rng, failed = random.Random(0), 0
    for case in range(240):
        data = bytearray(rng.choice(bases))
        if case % 4 == 0:
            data = data[: rng.randrange(1, len(data))]
        elif case % 4 == 1:
            for _ in range(rng.randrange(1, 12)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif case % 4 == 2:
            start = rng.randrange(len(data))
            data[start : start + 64] = bytes(len(data[start : start + 64]))
        else:
            data.insert(rng.randrange(len(data)), 0xFF)
        expected = verdict(decode_image, bytes(data))
        assert verdict(check_image, bytes(data)) == expected, case
        failed += expected is not None
    assert 40 < failed < 200  # both kinds of outcome were exercised
    small = ImageLimits(max_pixels=100, max_bytes=10_000)
    for data in [b"", png((1, 2, 3), size=64), bases[0], b"GIF89a"]:
        assert verdict(check_image, data, small) == verdict(decode_image, data, small) is not None


@pytest.mark.parametrize("workers", [1, 4])
def test_a_damaged_page_is_named_after_the_rows_before_it(tmp_path: Path, workers: int) -> None:
    path = tmp_path / "damaged.parquet"
    pq.write_table(rlaifv_table(preference_rows([(f"c{i}", f"r{i}") for i in range(600)])), path, row_group_size=100)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 200] = b"\xff" * 200
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"unreadable parquet data after row \d+") as info:
        read_preferences(path, workers=workers)
    assert str(path) in str(info.value)
    assert len(read_preferences(path, limit=5, workers=workers)) == 5


def test_a_large_preference_file_is_written_a_row_group_at_a_time(tmp_path: Path, monkeypatch) -> None:
    from rlaifv.trainer import data as data_module

    monkeypatch.setattr(data_module, "WRITE_ROWS", 2)
    rows = read_preferences(write_rlaifv_parquet(tmp_path / "in.parquet", preference_rows(PAIRS)))
    out = write_preferences(tmp_path / "out.parquet", rows)
    assert pq.ParquetFile(out).metadata.num_row_groups == -(-len(rows) // 2)
    assert [(r.id, r.image, r.chosen) for r in read_preferences(out)] == [(r.id, r.image, r.chosen) for r in rows]


_HELD = """
import ctypes, gc, sys
import pyarrow as pa
from rlaifv.trainer.data import read_preferences

def anon_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) / 1024

read_preferences(sys.argv[2], progress=False)  # warm-up: imports, threads, allocator arenas
before = anon_mb()
rows = read_preferences(sys.argv[1], progress=False)
gc.collect()
pa.default_memory_pool().release_unused()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the rows hold, not what allocators keep for reuse
print(anon_mb() - before, len(rows))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc")
def test_images_are_read_from_disk_not_held_in_process_memory(tmp_path: Path) -> None:
    """Rows hold their images as views into a memory-mapped temporary file (file-backed pages the kernel can
    drop), so reading a dataset does not add its images to the process's anonymous memory."""
    import io
    import mmap
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0)
    images = []
    for _ in range(100):  # incompressible: ~0.48 MB each as PNG, 46 MiB in all (allocators' noise: ~5 MiB)
        buffer = io.BytesIO()
        Image.fromarray(noise.integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    rows = preference_rows([(f"chosen {i}", f"rejected {i}") for i in range(200)])
    for i, row in enumerate(rows):
        row["image"] = {"bytes": images[i % 100], "path": None}  # every image twice
    path = write_rlaifv_parquet(tmp_path / "big.parquet", rows)
    small = write_rlaifv_parquet(tmp_path / "small.parquet", preference_rows(PAIRS))

    read = read_preferences(path, progress=False)
    assert all(isinstance(r.image, memoryview) and isinstance(r.image.obj, mmap.mmap) for r in read)
    assert [r.image for r in read] == [images[i % 100] for i in range(200)]
    assert read[0].image is read[100].image and hash(read[0].image) == hash(images[0])
    import copy
    import pickle

    sent = pickle.loads(pickle.dumps(read[1]))  # multiprocessing: a view cannot travel, its bytes do
    assert sent == read[1] and isinstance(sent.image, bytes) and copy.deepcopy(read[1]) == read[1]
    assert pickle.loads(pickle.dumps(read[1].prompt())) == read[1].prompt()

    held = subprocess.run(
        [sys.executable, "-c", _HELD, str(path), str(small)], capture_output=True, text=True, check=True
    ).stdout.split()
    image_mb = sum(map(len, images)) / 2**20
    assert int(held[1]) == 200
    assert float(held[0]) < image_mb / 4, f"{held[0]} MB held after reading {image_mb:.1f} MB of distinct images"


_HELD_UNTRIMMED = """
import gc, sys
from rlaifv.trainer.data import read_preferences

def anon_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) / 1024

read_preferences(sys.argv[2], progress=False)
before = anon_mb()
rows = read_preferences(sys.argv[1], progress=False)
gc.collect()
print(anon_mb() - before, len(rows))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc")
def test_a_json_array_file_leaves_no_parsed_text_in_the_heap(tmp_path: Path) -> None:
    """A JSON array is parsed whole; its strings, freed once the rows are built, stayed in glibc's heap for the
    rest of the run (about the file's size) until the reader handed them back."""
    import base64
    import io
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(1)
    records = []
    for i in range(60):  # incompressible: ~0.36 MB of base64 each, 21 MB in all
        buffer = io.BytesIO()
        Image.fromarray(noise.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        records.append({"id": str(i), "image": image, "question": "q?", "chosen": f"c{i}", "rejected": f"r{i}"})
    path, small = tmp_path / "big.json", tmp_path / "small.json"
    path.write_text(json.dumps(records))
    small.write_text(json.dumps(records[:2]))
    held = subprocess.run(
        [sys.executable, "-c", _HELD_UNTRIMMED, str(path), str(small)], capture_output=True, text=True, check=True
    ).stdout.split()
    file_mb = path.stat().st_size / 2**20
    assert int(held[1]) == 60
    assert float(held[0]) < file_mb / 4, f"{held[0]} MB held after reading a {file_mb:.1f} MB JSON array"


def test_a_large_spill_on_a_memory_backed_filesystem_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from rlaifv.trainer import image_spill

    if image_spill.filesystem_type("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    path = write_rlaifv_parquet(tmp_path / "p.parquet", preference_rows(PAIRS))
    monkeypatch.setattr(image_spill, "WARN_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", "/dev/shm")
    with pytest.warns(UserWarning, match="memory-backed filesystem.*Set TMPDIR"):
        rows = read_preferences(path, progress=False)
    assert rows[0].image == png(COLOURS[0])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_preferences(path, progress=False)  # a disk: no warning


def test_prompts_of_files_with_one_name_in_two_folders_get_their_own_ids(tmp_path: Path) -> None:
    """a/train.jsonl and b/train.jsonl both named their first row train:0: one seed for two prompts."""
    for folder, colour in (("a", (200, 0, 0)), ("b", (0, 200, 0))):
        (tmp_path / "data" / folder).mkdir(parents=True)
        (tmp_path / "data" / folder / "i.png").write_bytes(png(colour))
        line = {"image": "i.png", "question": f"what is in {folder}?"}
        (tmp_path / "data" / folder / "train.jsonl").write_text(json.dumps(line) + "\n")
    assert [p.id for p in read_prompts(tmp_path / "data")] == ["a/train:0", "b/train:0"]
    assert [p.id for p in read_prompts(tmp_path / "data" / "a" / "train.jsonl")] == ["train:0"]
    (tmp_path / "data" / "b" / "train.jsonl").rename(tmp_path / "data" / "b" / "val.jsonl")
    assert [p.id for p in read_prompts(tmp_path / "data")] == ["train:0", "val:0"]  # unique stems keep their ids


def test_an_id_shared_by_two_prompts_is_made_unique_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "i.png").write_bytes(png((1, 2, 3)))
    lines = [{"id": "x", "image": "i.png", "question": q} for q in ("one?", "two?", "three?")]
    lines.append({"id": "x#2", "image": "i.png", "question": "four?"})
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.warns(UserWarning, match=r"3 prompts of .*p\.jsonl reuse the id of another prompt \('x', 'x', 'x#2'\)"):
        prompts = read_prompts(path)
    assert [p.id for p in prompts] == ["x", "x#2", "x#3", "x#2#2"]


def test_image_values_that_cannot_be_read_say_what_they_are(tmp_path: Path) -> None:
    """A URL, a list of images and a photo over the pixel limit were 'not found', 'no image bytes' and
    'undecodable'; URL-safe base64 was 'not found'."""
    import base64

    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("RGB", (4097, 4097)).save(big)
    urlsafe = base64.urlsafe_b64encode(png((250, 251, 252), size=64)).decode()
    assert "-" in urlsafe or "_" in urlsafe
    cases = [
        ("https://example.com/cat.jpg", "images are not downloaded here"),
        (["a.png", "b.png"], "a list of 2 images"),
        (str(big), "image too large: image is 4097x4097"),
    ]
    for value, message in cases:
        path = tmp_path / "p.jsonl"
        path.write_text(json.dumps({"image": value, "question": "q?"}) + "\n")
        with pytest.raises(ImageDecodeError, match=message):
            read_prompts(path)
    path.write_text(json.dumps({"image": urlsafe, "question": "q?"}) + "\n")
    assert read_prompts(path)[0].image == png((250, 251, 252), size=64)


def test_an_image_of_an_unusable_shape_is_named_so_not_undecodable() -> None:
    """The aspect bound the image limits gained was reported as "undecodable image"."""
    import io

    from PIL import Image

    from rlaifv.trainer.data import check_row_image
    from rlaifv.trainer.errors import ImageDecodeError

    buffer = io.BytesIO()
    Image.new("RGB", (1, 100)).save(buffer, "PNG")
    with pytest.raises(ImageDecodeError, match="unusable shape: image is 1x100: aspect ratio over 20"):
        check_row_image(buffer.getvalue(), source="d.jsonl", row=3, column="image")


def test_a_hashed_image_name_that_is_not_there_is_named_as_a_missing_file(tmp_path: Path) -> None:
    """`images/<65 hex>` is valid base64: it was decoded and reported as "undecodable image"."""
    from rlaifv.trainer.data import row_image_bytes

    name = "images/" + "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881a"
    with pytest.raises(ImageDecodeError, match=r"image file images/2d71.* not found"):
        row_image_bytes(name, tmp_path, source="d.jsonl", row=0, column="image")
    with pytest.raises(ImageDecodeError, match="not valid base64"):  # base64 that is only broken stays so
        row_image_bytes("A" * 65, tmp_path, source="d.jsonl", row=0, column="image")


class _DiskWithRoom(io.RawIOBase):
    """A temporary file on a disk with `room` bytes left: a write past them takes what fits, then fails ENOSPC."""

    def __init__(self, room: int) -> None:
        self.room, self.held = room, bytearray()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        import errno

        fits = min(len(data), self.room - len(self.held))
        if fits <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.held += bytes(data[:fits])
        return fits


def test_a_full_temporary_folder_fails_the_image_it_cannot_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spill's buffer took the images a full TMPDIR could not: the error came later, from close(), as a bare
    OSError, and in place of the error the `with` was already raising."""
    import tempfile

    from rlaifv.trainer import image_spill

    def on_a_full_disk(*args, buffering: int = -1, **kwargs):
        disk = _DiskWithRoom(1000)
        return disk if buffering == 0 else io.BufferedRandom(disk)

    monkeypatch.setattr(tempfile, "TemporaryFile", on_a_full_disk)
    full = pytest.raises(DataError, match=r"cannot store the dataset's images .*No space left on device")
    with full, image_spill.ImageSpill() as spill:
        for i in range(5):
            spill.add(bytes([i]) * 300)
    with pytest.raises(DataError, match="a row the reader refused"), image_spill.ImageSpill() as spill:
        spill.add(b"x" * 300)  # the buffer's flush on close failed, in place of this error
        raise DataError("a row the reader refused")


def test_a_folder_holding_a_file_and_its_gzip_is_refused(tmp_path: Path) -> None:
    """`train.jsonl` beside `train.jsonl.gz`: every row was read twice."""
    import gzip

    from rlaifv.trainer.data import data_files

    folder = tmp_path / "data"
    (folder / "more").mkdir(parents=True)
    line = json.dumps({"id": "r0", "image": "a.png", "question": "q", "chosen": "c", "rejected": "r"}) + "\n"
    (folder / "more" / "train.jsonl").write_text(line)
    (folder / "more" / "other.jsonl.gz").write_bytes(gzip.compress(line.encode()))
    assert len(data_files(folder)) == 2  # different files, one of them gzipped: both read
    (folder / "more" / "train.jsonl.gz").write_bytes(gzip.compress(line.encode()))
    with pytest.raises(DataError, match=r"more/train\.jsonl and more/train\.jsonl\.gz: the same data twice\? keep one"):
        data_files(folder)
