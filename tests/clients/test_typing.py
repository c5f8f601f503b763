"""The SDK's annotations as a user's `mypy --strict` sees them: what the README shows type-checks, and arguments the
SDK refuses at run time are refused by the checker too."""

from __future__ import annotations

from pathlib import Path

import pytest

SDK_SRC = Path(__file__).resolve().parents[2] / "clients" / "python" / "src"

# `# type: ignore[...]` marks the calls mypy must refuse: strict mode reports an ignore that is not needed.
USER_CODE = """
import contextlib
import io
from pathlib import Path

import pydantic
from PIL import Image

from rlaifv_client import AsyncClient, Client, Job, JobResult


class Reply(pydantic.BaseModel):
    role: str
    content: str | None = None


async def read_async(client: AsyncClient) -> list[JobResult]:
    async with contextlib.aclosing(client.jobs.results("j1")) as results:
        return [item async for item in results]


def read_sync(client: Client) -> list[JobResult]:
    with contextlib.closing(client.jobs.results("j1")) as results:
        return list(results)


def images(client: Client, path: Path, data: bytes) -> None:
    with open(path, "rb") as file:
        client.score(answers=["a"], image=file)
    client.score(answers=["a"], image=str(path), images=[path, data, bytearray(data), io.BytesIO(data)])
    client.score(answers=["a"], image=Image.open(path), images=[Image.new("RGB", (1, 1))])
    client.score(answers=["a"], image="data:image/png;base64,iVBORw0KGgo=")
    client.score(answers=["a"], image=5)  # type: ignore[arg-type]
    client.score(answers=["a"], images=[path, 5.0])  # type: ignore[list-item]
    with open(path) as text:
        client.score(answers=["a"], image=text)  # type: ignore[arg-type]


def from_a_newer_server(job: Job) -> bool:
    return job.object == "batch"  # a str, not Literal["job"]: no "non-overlapping equality" error


def messages(client: Client) -> None:
    reply = Reply(role="assistant", content="A cat.")
    client.score(answers=["a"], messages=[{"role": "user", "content": "What is it?"}, reply])
"""


def test_user_code_type_checks_strictly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = pytest.importorskip("mypy.api")
    (tmp_path / "user_code.py").write_text(USER_CODE)
    (tmp_path / "mypy.ini").write_text(f"[mypy]\nstrict = True\npython_version = 3.11\nmypy_path = {SDK_SRC}\n")
    monkeypatch.chdir(tmp_path)  # the snippet's own configuration, none of the repository's (PIL typed, not skipped)
    out, err, status = api.run(["--config-file", "mypy.ini", "--cache-dir", str(tmp_path / "cache"), "user_code.py"])
    assert status == 0, out + err
