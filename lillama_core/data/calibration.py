"""Calibration text -> fixed-length token sequences.

Sources: the built-in set (WikiText-2 validation + Alpaca seed tasks, see assets/calibration/LICENSE.md),
local .txt/.jsonl/.json/.parquet/.csv files, or a `datasets` id. Instruction and chat records go
through the model's chat template so the student sees the format it will be used with. Files are
read as a stream, so a huge file costs only the tokens the budget asks for. Text files may start with a
byte-order mark (Excel's "CSV UTF-8", Notepad): it is dropped, never taken for part of a field name.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jinja2 import TemplateError  # what a chat template's raise_exception() raises in transformers

from ..config import CalibrationConfig
from ..errors import CalibrationError, first_line
from ..runtime.paths import ASSETS

DEFAULT_SOURCES = (ASSETS / "calibration" / "wikitext2_valid.txt", ASSETS / "calibration" / "alpaca_seed_tasks.jsonl")
DEFAULT_EVAL_TEXT = ASSETS / "eval" / "wikitext2_test.txt"
TEXT_FIELDS = ("text", "content", "document", "body", "sentence", "prompt")
# Reading stops once this many times the budget is in hand: enough to sample from, bounded for huge files.
POOL_FACTOR = 4
TEXT_CHUNK_CHARS = 1 << 16
# "utf-8-sig" reads UTF-8 and drops a leading byte-order mark; without it the mark sticks to the first
# field name of a CSV and makes the first line of a JSONL invalid.
ENCODING = "utf-8-sig"


Record = str | list  # plain text, or a list of chat messages


# ---- records from each kind of source ----


def _check_text(sample: bytes, path: Path) -> None:
    if b"\x00" in sample:
        raise CalibrationError(f"{path} looks binary, not text")


def _text_file(path: Path) -> Iterator[Record]:
    with path.open("rb") as raw:
        _check_text(raw.read(4096), path)
    chunk = []
    size = 0
    with path.open(encoding=ENCODING, errors="strict") as handle:
        try:
            for line in handle:
                chunk.append(line)
                size += len(line)
                if size >= TEXT_CHUNK_CHARS:
                    yield "".join(chunk)
                    chunk, size = [], 0
        except UnicodeDecodeError:
            raise CalibrationError(f"{path} is not UTF-8 text") from None
    if chunk:
        yield "".join(chunk)


def _jsonl_file(path: Path) -> Iterator[dict]:
    with path.open("rb") as raw:
        _check_text(raw.read(4096), path)
    with path.open(encoding=ENCODING, errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    raise CalibrationError(f"{path}, line {number}: not valid JSON") from None


JSON_MAX_BYTES = 256 * 2**20  # a .json file is parsed whole; bigger data belongs in streamed .jsonl


def _json_file(path: Path) -> Iterator[dict]:
    size = path.stat().st_size
    if size > JSON_MAX_BYTES:
        raise CalibrationError(f"{path} is {size / 2**20:,.0f} MiB; a .json file is read whole, so convert it to "
                               ".jsonl (one record per line), which is streamed")
    try:
        data = json.loads(path.read_text(encoding=ENCODING))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path} is not valid JSON: {exc}") from None
    if isinstance(data, dict):  # {"data": [...]} or columns {"text": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
        elif lists and all(len(v) == len(lists[0]) for v in lists):
            keys = [k for k, v in data.items() if isinstance(v, list)]
            data = [dict(zip(keys, row, strict=True)) for row in zip(*(data[k] for k in keys), strict=True)]
    if not isinstance(data, list):
        raise CalibrationError(f"{path}: expected a list of records")
    yield from data


def _csv_file(path: Path) -> Iterator[dict]:
    with path.open("rb") as raw:
        _check_text(raw.read(4096), path)
    with path.open(newline="", encoding=ENCODING, errors="strict") as handle:
        try:
            yield from csv.DictReader(handle)
        except UnicodeDecodeError:
            raise CalibrationError(f"{path} is not UTF-8 text") from None
        except csv.Error as exc:
            raise CalibrationError(f"{path} is not a readable CSV file: {exc}") from None


def _parquet_file(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise CalibrationError(f"{path} is not a readable Parquet file: {exc}") from None
    for batch in parquet.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _dataset(config: CalibrationConfig) -> Iterator[dict]:
    try:
        import datasets
    except ImportError:
        raise CalibrationError("reading a hub dataset needs the `datasets` package") from None
    try:
        stream = datasets.load_dataset(config.source, config.dataset_config, split=config.split, streaming=True)
        yield from stream
    except Exception as exc:
        raise CalibrationError(
            f"could not read dataset {config.source!r} (split {config.split!r}): {first_line(exc)}. "
            "Without internet, use the built-in set or a local file."
        ) from None


FILE_READERS = {".txt": _text_file, ".md": _text_file, ".jsonl": _jsonl_file, ".json": _json_file,
                ".csv": _csv_file, ".parquet": _parquet_file}


def raw_records(config: CalibrationConfig) -> Iterator:
    if config.source == "default":
        for path in DEFAULT_SOURCES:
            yield from FILE_READERS[path.suffix](path)
        return
    path = Path(config.source).expanduser()
    if path.suffix.lower() in FILE_READERS or path.exists() or config.source.startswith((".", "/", "~")):
        if not path.is_file():
            raise CalibrationError(f"calibration file not found: {path}")
        reader = FILE_READERS.get(path.suffix.lower())
        if reader is None:
            raise CalibrationError(f"{path}: unsupported file type; use .txt, .jsonl, .json, .parquet or .csv")
        yield from reader(path)
        return
    yield from _dataset(config)


def to_record(item, text_field: str | None) -> Record:
    """A raw item becomes plain text or a chat (list of role/content messages)."""
    if isinstance(item, str):
        return item
    if not isinstance(item, dict):
        raise CalibrationError(f"calibration records must be text or objects, found {type(item).__name__}")
    if text_field:
        if text_field not in item:
            raise CalibrationError(f"field {text_field!r} not found; records have: {_field_names(item)}")
        value = item[text_field]
        return value if isinstance(value, list) else str(value)
    if isinstance(item.get("messages"), list):
        return item["messages"]
    if "instruction" in item:
        return _instruction_chat(item)
    for key in TEXT_FIELDS:
        if isinstance(item.get(key), str):
            return item[key]
    strings = [k for k, v in item.items() if isinstance(v, str)]
    if not strings:
        raise CalibrationError(f"no text field in records with fields {_field_names(item)}; choose one")
    return item[strings[0]]


def _field_names(item: dict) -> str:
    """Names as repr() writes them, so a hidden character (a stray byte-order mark, a trailing space) shows."""
    return ", ".join(map(repr, item))


def _instruction_chat(item: dict) -> list[dict]:
    """Alpaca-style records (instruction, input, output or instances) -> user/assistant messages."""
    single = {"input": item.get("input", ""), "output": item.get("output", item.get("response", ""))}
    instances = item.get("instances") or [single]
    first = instances[0]
    prompt = item["instruction"] + (f"\n\n{first['input']}" if first.get("input") else "")
    chat = [{"role": "user", "content": prompt}]
    if first.get("output"):
        chat.append({"role": "assistant", "content": str(first["output"])})
    return chat


@dataclass
class TemplateTally:
    """What the chat template made of the chat records read: how many it refused as given (a template in the
    style of Gemma's or Mistral's raises on a system turn or on turns that do not alternate), how many of
    those it took once made alternating, and how many became plain text. `first` names the first refusal."""

    chats: int = 0
    folded: int = 0
    plain: int = 0
    first: str = ""

    def warning(self) -> str:
        """One line for the user, or "" when the template took every record as given."""
        refused = self.folded + self.plain
        if not refused:
            return ""
        kept = []
        if self.folded:
            kept.append(f"{self.folded} with system turns folded into the first user turn and repeated roles merged")
        if self.plain:
            kept.append(f"{self.plain} as plain 'role: content' text")
        return (f"the chat template refused {refused} of {self.chats} chat records ({self.first}); used "
                f"{' and '.join(kept)}")


def alternating_turns(messages: list[dict]) -> list[dict]:
    """The same chat as user/assistant turns that alternate: system turns folded into the first user turn
    (one is made if the chat has none), and consecutive turns of one role joined by a blank line."""
    system = [str(m.get("content", "")) for m in messages if m.get("role") == "system"]
    turns: list[dict] = []
    for message in messages:
        role = message.get("role", "user")
        if role == "system":
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = f"{turns[-1]['content']}\n\n{message.get('content', '')}"
        else:
            turns.append({"role": role, "content": message.get("content", "")})
    if system:
        if turns and turns[0]["role"] == "user":
            turns[0]["content"] = "\n\n".join([*system, str(turns[0]["content"])])
        else:
            turns.insert(0, {"role": "user", "content": "\n\n".join(system)})
    return turns


def plain_chat(messages: list[dict]) -> str:
    return "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)


def record_text(record: Record, tokenizer, use_template: bool, tally: TemplateTally | None = None,
                number: int = 0) -> str:
    """A record as model text. A chat the template refuses is retried as alternating turns, then falls back
    to plain text; `tally` (if given) counts both, and `number` (1-based) names the record in its message."""
    if isinstance(record, str):
        return record
    if not (use_template and getattr(tokenizer, "chat_template", None)):
        return plain_chat(record)
    tally = tally if tally is not None else TemplateTally()
    tally.chats += 1
    try:
        return tokenizer.apply_chat_template(record, tokenize=False)
    except TemplateError as exc:
        tally.first = tally.first or f"first: record {number}, {str(exc)!r}"
    try:
        text = tokenizer.apply_chat_template(alternating_turns(record), tokenize=False)
        tally.folded += 1
        return text
    except TemplateError:
        tally.plain += 1
        return plain_chat(record)


def iter_texts(config: CalibrationConfig, tokenizer, tally: TemplateTally | None = None) -> Iterator[str]:
    """Non-empty texts of the source's records, in order; `tally` collects what the chat template refused."""
    for number, item in enumerate(raw_records(config), 1):
        text = record_text(to_record(item, config.text_field), tokenizer, config.chat_template, tally, number)
        if text.strip():
            yield text


def preview(config: CalibrationConfig, tokenizer, count: int = 3, chars: int = 400) -> list[str]:
    return [text[:chars] for text in itertools.islice(iter_texts(config, tokenizer), count)]


# ---- token sequences ----


@dataclass
class CalibrationData:
    """Fixed-length token sequences and, for models that read more than tokens, the other inputs of each row
    (a speech model's audio features), all cut together."""

    sequences: torch.Tensor  # [n, seq_len] token ids (the decoder's, for encoder-decoder models)
    source: str
    pool_tokens: int  # tokens read before sampling
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # forward keyword -> [n, ...] per-row inputs
    warnings: list[str] = field(default_factory=list)  # what the user should know about how the data was read
    sequence_input: str = "input_ids"  # the forward keyword the token ids go to

    @property
    def tokens(self) -> int:
        return self.sequences.numel()

    def select(self, rows) -> CalibrationData:
        """The chosen rows (a slice or index tensor) of the sequences and of every other input."""
        return CalibrationData(self.sequences[rows], self.source, self.pool_tokens,
                               {name: value[rows] for name, value in self.inputs.items()},
                               sequence_input=self.sequence_input)

    def first_tokens(self, tokens: int) -> CalibrationData:
        """A prefix of about `tokens` tokens, at least two sequences."""
        return self.select(slice(0, max(2, tokens // self.sequences.shape[1])))

    def model_inputs(self, rows, device: torch.device) -> dict:
        """Keyword arguments of the model's forward for these rows."""
        return {self.sequence_input: self.sequences[rows].to(device),
                **{name: value[rows].to(device) for name, value in self.inputs.items()}}


def token_stream(texts: Iterable[str], tokenizer, separator: int | None) -> Iterator[int]:
    for text in texts:
        yield from tokenizer(text, add_special_tokens=False)["input_ids"]
        if separator is not None:
            yield separator


def leading_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (Gemma's and Llama's <bos>; none for SmolLM2).
    Models trained with them see them first in every sequence, and some (Gemma) fall apart without them."""
    marked = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(marked) - len(plain) + 1):
        if marked[start: start + len(plain)] == plain:
            return marked[:start]
    return []


def with_leading_tokens(pool: list[int], tokenizer, seq_len: int) -> torch.Tensor:
    """[n, seq_len] rows: the tokenizer's leading tokens, then the next seq_len - len(those) tokens of the pool."""
    prefix = leading_tokens(tokenizer)
    body = seq_len - len(prefix)
    if body < 1:
        raise CalibrationError(f"sequence length {seq_len} leaves no room after the model's {len(prefix)} leading "
                               "special tokens")
    n = len(pool) // body
    chunks = torch.tensor(pool[: n * body], dtype=torch.long).view(n, body)
    return torch.cat([torch.tensor([prefix] * n, dtype=torch.long).view(n, len(prefix)), chunks], dim=1)


def build_sequences(texts: Iterable[str], tokenizer, tokens: int, seq_len: int, seed: int,
                    source: str = "") -> CalibrationData:
    """Cut the token stream into seq_len pieces (each led by the tokenizer's <bos> if it adds one) and sample
    enough of them, seeded, for the budget."""
    wanted = -(-tokens // seq_len)
    limit = wanted * seq_len * POOL_FACTOR
    stream = token_stream(texts, tokenizer, tokenizer.eos_token_id)
    pool = list(itertools.islice(stream, limit))
    chunks = with_leading_tokens(pool, tokenizer, seq_len)
    n_available = chunks.shape[0]
    if n_available == 0:
        raise CalibrationError(
            f"calibration data has {len(pool)} tokens, fewer than one sequence of {seq_len}; "
            "add text or lower the sequence length"
        )
    if n_available < wanted:
        raise CalibrationError(
            f"calibration data has only {len(pool)} tokens ({n_available} sequences of {seq_len}) "
            f"but the budget asks for {tokens}; lower the token budget or add text"
        )
    order = torch.randperm(n_available, generator=torch.Generator().manual_seed(seed))[:wanted]
    return CalibrationData(chunks[order], source, len(pool))


def load_calibration(config: CalibrationConfig, tokenizer) -> CalibrationData:
    """Read the calibration source and cut it into seeded token sequences for the budget.

    Args:
        config: source, text field, token budget (tokens), sequence length (tokens) and seed.
        tokenizer: the model's tokenizer; its chat template formats chat and instruction records.

    Returns:
        CalibrationData: [ceil(tokens / seq_len), seq_len] token ids, each row led by the tokenizer's leading
        special tokens; `warnings` says how many chat records the template refused and what was done instead.

    Raises:
        CalibrationError: a missing, binary, non-UTF-8 or malformed file, an unknown text field, an unreachable
            dataset, or too few tokens for the budget.
        ConfigError: a non-positive budget, length or batch size.
    """
    config.validate()
    tally = TemplateTally()
    data = build_sequences(iter_texts(config, tokenizer, tally), tokenizer, config.tokens, config.seq_len,
                           config.seed, source=config.source)
    warning = tally.warning()
    data.warnings = [warning] if warning else []
    return data


def read_eval_text(path: str | os.PathLike = "default") -> str:
    path = DEFAULT_EVAL_TEXT if str(path) == "default" else Path(path).expanduser()
    if not path.is_file():
        raise CalibrationError(f"evaluation text not found: {path}")
    return "".join(_text_file(path))
