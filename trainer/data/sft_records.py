"""SFT examples: reading prompt/response or chat records, and rendering them to prompt and response text.

Records (one JSON object per line of a .jsonl file, or one row of a `datasets` dataset):

    {"prompt": str, "response": str}
        used verbatim: the prompt text, then the response text (give `messages` to get a template)
    {"messages": [{"role": str, "content": str}, ...]}
        the last message with role "assistant" is the response and every message before it is
        the prompt; messages after it are not used

The field names are configurable (--prompt-field, --response-field, --messages-field); a record
with a messages field is read as messages. A missing field, a non-string, an empty response or a
chat without an assistant message is a DataError naming the file and line (or row) and the field.

Rendering messages. With a chat template (a Hugging Face tokenizer.json, or a tokenizer directory
holding one, whose sibling tokenizer_config.json has "chat_template"), through transformers:

    prompt   = apply_chat_template(prompt messages, tokenize=False, add_generation_prompt=True)
    response = apply_chat_template(all messages up to the response, tokenize=False) minus that
               prompt prefix, so the template's end-of-turn marker belongs to the response (the model
               learns to close its turn); the bare assistant content if the full rendering does not
               start with the prompt (counted and logged)

Without one, the simple template:

    prompt   = "".join(f"{role}: {content}\\n" for each prompt message) + "assistant: "
    response = the assistant message's content

    e.g. system "Be brief.", user "2+2?", assistant "4"
         -> prompt "system: Be brief.\\nuser: 2+2?\\nassistant: ", response "4"
"""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .corpus import expand_files
from rundir.errors import DataError

logger = logging.getLogger(__name__)

ASSISTANT = "assistant"
TOKENIZER_CONFIG = "tokenizer_config.json"
_JSONL_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class SFTFields:
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"


@dataclass(frozen=True)
class SFTRecord:
    where: str  # "data/chat.jsonl line 7" or "row 7 of dataset ...": names the record in errors
    # Decides the train/val split (prepare.is_val): the record's content, so duplicates always
    # land in the same split and the split survives reordering, renaming and moving the files.
    identity: str
    prompt: Optional[str] = None  # prompt/response records
    response: Optional[str] = None
    messages: Optional[Tuple[Tuple[str, str], ...]] = None  # (role, content), the response last


def _text(row: Dict, field: str, where: str) -> str:
    if field not in row:
        raise DataError(f"{where}: no field {field!r} (fields: {', '.join(sorted(map(str, row))) or 'none'}); "
                        f"each record needs {field!r} or a messages list (see --prompt-field/--response-field/"
                        "--messages-field)")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} holds {type(value).__name__}, not a string")
    return value


def _messages(value, field: str, where: str) -> Tuple[Tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of {{role, content}} objects, "
                        f"got {type(value).__name__ if not isinstance(value, list) else 'an empty list'}")
    turns = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: {field}[{i}] must be an object with string 'role' and 'content', "
                            f"got {json.dumps(message, ensure_ascii=False)[:200]}")
        turns.append((message["role"], message["content"]))
    last = max((i for i, (role, _) in enumerate(turns) if role == ASSISTANT), default=None)
    if last is None:
        raise DataError(f"{where}: field {field!r} has no message with role {ASSISTANT!r} "
                        f"(roles: {', '.join(role for role, _ in turns)}); the last assistant message is the response")
    if not turns[last][1].strip():
        raise DataError(f"{where}: {field}[{last}] (the last assistant message, the response) has empty 'content'")
    return tuple(turns[: last + 1])


def parse_record(row, where: str, fields: SFTFields) -> SFTRecord:
    """Validate one record (before any tokenization) and keep what rendering needs."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    if row.get(fields.messages) is not None:
        turns = _messages(row[fields.messages], fields.messages, where)
        return SFTRecord(where, json.dumps(turns, ensure_ascii=False), messages=turns)
    prompt, response = _text(row, fields.prompt, where), _text(row, fields.response, where)
    if not response.strip():
        raise DataError(f"{where}: field {fields.response!r} is empty; every example needs a response")
    return SFTRecord(where, json.dumps([prompt, response], ensure_ascii=False), prompt=prompt, response=response)


# --- where records come from ---------------------------------------------------------------------

class JsonlRecords:
    """Local JSON-lines files, read directly so that errors can name the file and line."""

    remote = False

    def __init__(self, patterns: Sequence[str], fields: SFTFields):
        self.files = expand_files(patterns)
        for path in self.files:
            if path.suffix.lower() not in _JSONL_SUFFIXES:
                raise DataError(f"--files {path}: --format sft reads JSON lines ({', '.join(_JSONL_SUFFIXES)}); "
                                "for other formats give a directory or dataset with --dataset")
        self.fields = fields
        self.source = {"kind": "files", "builder": "jsonl", "patterns": list(patterns), "num_files": len(self.files)}

    def records(self) -> Iterator[SFTRecord]:
        for path in self.files:
            with open(path, "rb") as f:
                for number, raw in enumerate(f, start=1):
                    where = f"{path} line {number}"
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise DataError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
                    if not line.strip():
                        continue  # blank lines (a trailing newline or two) carry no record
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                    yield parse_record(row, where, self.fields)


def _is_saved_dataset(name: str) -> bool:
    # What Dataset/DatasetDict.save_to_disk writes; load_dataset refuses such folders.
    return os.path.isdir(name) and any(os.path.isfile(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json"))


class DatasetRecords:
    """A `datasets` dataset: a hub name or local folder of data files (streamed through
    load_dataset, as pretraining's HubCorpus), or a folder written by save_to_disk."""

    def __init__(self, name: str, config: Optional[str], split: str, fields: SFTFields):
        import datasets

        self.fields = fields
        self.what = f"dataset {name!r} (config={config!r}, split={split!r})"
        self.remote = not os.path.exists(name)
        try:
            if _is_saved_dataset(name):
                data = datasets.load_from_disk(name)
                if isinstance(data, datasets.DatasetDict):
                    if split not in data:
                        raise DataError(f"{self.what} has no split {split!r} (splits: {', '.join(data)}); "
                                        "choose one with --split")
                    data = data[split]
            else:
                data = datasets.load_dataset(name, name=config, split=split, streaming=True)
        except DataError:
            raise
        except Exception as exc:  # connection, not-found and bad-config errors all land here
            raise DataError(
                f"could not open {self.what}: {type(exc).__name__}: {exc}. Check the name (and that the hub "
                "is reachable from this machine), or give local JSON lines with --files."
            ) from exc
        self.dataset = data
        self.source = {"kind": "hub" if self.remote else "local_dataset", "dataset": name, "config": config,
                       "split": split}

    def records(self) -> Iterator[SFTRecord]:
        i = -1
        try:
            for i, row in enumerate(self.dataset):
                yield parse_record(row, f"row {i} of {self.what}", self.fields)
        except OSError as exc:
            raise DataError(f"reading {self.what} failed after row {i}: {exc}") from exc


# --- turning a record into prompt and response text ----------------------------------------------

class SimpleTemplate:
    """The documented fallback template (see the module docstring)."""

    description = {"kind": "simple"}
    fallbacks = 0

    def prompt_for(self, turns: Sequence[Tuple[str, str]]) -> str:
        return "".join(f"{role}: {content}\n" for role, content in turns) + f"{ASSISTANT}: "

    def render(self, record: SFTRecord) -> Tuple[str, str]:
        if record.messages is None:
            return record.prompt, record.response
        return self.prompt_for(record.messages[:-1]), record.messages[-1][1]


class ChatTemplate(SimpleTemplate):
    """A Hugging Face chat template, rendered by transformers' apply_chat_template."""

    def __init__(self, tokenizer_json: Path, config_file: Path, config: Dict):
        from transformers import PreTrainedTokenizerFast

        template = config["chat_template"]
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not isinstance(template, str) or not template.strip():
            raise DataError(f"{config_file}: chat_template must be a string (or a list with a 'default' entry)")
        # The special tokens the template may refer to ({{ eos_token }}, {{ bos_token }}).
        special = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                special[name] = value
        try:
            self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), **special)
        except Exception as exc:
            raise DataError(f"transformers cannot load {tokenizer_json} for its chat template: {exc}") from exc
        self.tokenizer.chat_template = template
        self.where = config_file
        self.description = {"kind": "chat_template", "config": TOKENIZER_CONFIG}
        self.fallbacks = 0  # records whose full rendering did not start with their prompt

    def _apply(self, turns, add_generation_prompt: bool) -> str:
        chat = [{"role": role, "content": content} for role, content in turns]
        try:
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja raises its own types, including the template's raise_exception()
            raise DataError(f"the chat template of {self.where} failed: {type(exc).__name__}: {exc}") from exc

    def prompt_for(self, turns: Sequence[Tuple[str, str]]) -> str:
        return self._apply(turns, add_generation_prompt=True)

    def render(self, record: SFTRecord) -> Tuple[str, str]:
        if record.messages is None:
            return record.prompt, record.response
        prompt = self.prompt_for(record.messages[:-1])
        full = self._apply(record.messages, add_generation_prompt=False)
        if full.startswith(prompt) and len(full) > len(prompt):
            return prompt, full[len(prompt):]
        self.fallbacks += 1
        return prompt, record.messages[-1][1]


def resolve_tokenizer(path: str) -> Tuple[Path, Optional[Path]]:
    """The tokenizer file behind --tokenizer (a file, or a Hugging Face directory) and its
    sibling tokenizer_config.json if there is one."""
    given = Path(path)
    if given.is_dir():
        candidates = [given / "tokenizer.json", given / "tokenizer.model"]
        file = next((c for c in candidates if c.is_file()), None)
        if file is None:
            raise DataError(f"--tokenizer {path} is a directory without tokenizer.json or tokenizer.model")
    elif given.is_file():
        file = given
    else:
        raise DataError(f"--tokenizer {path}: no such file or directory")
    config = file.parent / TOKENIZER_CONFIG
    return file, config if config.is_file() else None


def template_for(tokenizer_file: Optional[Path], config_file: Optional[Path]) -> SimpleTemplate:
    """The chat template of the tokenizer if it has one, else the simple template."""
    if tokenizer_file is None or config_file is None:
        return SimpleTemplate()
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {config_file} (beside --tokenizer {tokenizer_file}): {exc}") from exc
    if not isinstance(config, dict) or not config.get("chat_template"):
        return SimpleTemplate()
    if tokenizer_file.read_bytes()[:64].lstrip()[:1] != b"{":
        raise DataError(
            f"{config_file} has a chat_template, but chat templates are rendered only with a Hugging Face "
            f"tokenizer.json and {tokenizer_file} is a sentencepiece model; give the tokenizer.json, or "
            "remove chat_template to use the simple template"
        )
    return ChatTemplate(tokenizer_file, config_file, config)


def render_all(records: List[SFTRecord], template: SimpleTemplate) -> Tuple[List[str], List[str]]:
    prompts, responses = [], []
    for record in records:
        prompt, response = template.render(record)
        prompts.append(prompt)
        responses.append(response)
    return prompts, responses
