"""Reading the two table formats benchmarks ship in: VLMEvalKit TSVs and Hugging Face parquet shards."""

from __future__ import annotations

from pathlib import Path

from .item import Base64Image, BenchmarkError, plain, text


def find_file(path: Path, pattern: str, what: str) -> Path:
    """`path` itself when it is a file, else the one file matching `pattern` inside it."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise BenchmarkError(f"{path} does not exist: give the {what}")
    found = sorted(p for p in path.glob(pattern) if p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise BenchmarkError(f"no {what} ({pattern}) in {path}")
    names = ", ".join(p.name for p in found)
    raise BenchmarkError(f"several candidates for the {what} in {path} ({names}): give the file itself")


def read_tsv(path: Path) -> list[dict]:
    """A VLMEvalKit TSV as row dicts, with pandas' reading of empty cells (the authors' and VLMEvalKit's own).

    VLMEvalKit stores a picture once: a row whose `image` cell is short names the `index` of the row holding it."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, sep="\t")
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise BenchmarkError(f"{path.name} is not a readable TSV file: {err}") from None
    for column in ("index", "question", "answer", "image"):
        if column not in frame.columns:
            raise BenchmarkError(f"{path.name} has no '{column}' column: expected a VLMEvalKit TSV "
                                 f"(index, question, A, B, ..., answer, category, image)")
    rows = frame.to_dict(orient="records")
    pictures = {text(row["index"]): text(row["image"]) for row in rows}
    for row in rows:
        picture = text(row["image"])
        if 0 < len(picture) <= 64 and pictures.get(picture, "") and len(pictures[picture]) > 64:
            picture = pictures[picture]
        row["image"] = Base64Image(picture) if picture else None
        row["index"] = plain(row["index"])
    return rows


def parquet_files(folder: Path, pattern: str = "*.parquet") -> list[Path]:
    """Parquet shards in sorted file order, in `folder` or its `data/` subfolder (the Hub's layout)."""
    if folder.is_file() and folder.suffix == ".parquet":
        return [folder]
    if not folder.is_dir():
        raise BenchmarkError(f"{folder} does not exist: give the folder holding the benchmark's parquet files")
    for candidate in (folder, folder / "data"):
        files = sorted(p for p in candidate.glob(pattern) if p.is_file())
        if files:
            return files
    raise BenchmarkError(f"no parquet files ({pattern}) in {folder} or {folder / 'data'}")


def read_parquet(files: list[Path]) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for file in files:
        try:
            rows.extend(pq.read_table(file).to_pylist())
        except (OSError, pa.ArrowException) as err:
            raise BenchmarkError(f"{file.name} is not a readable parquet file: {err}") from None
    return rows
