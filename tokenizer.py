"""Text <-> token ids for every model we run, and the chat prompt each model expects.

Three file formats, one small interface (`Tokenizer`):

    tokenizer.json     HF `tokenizers` (hub repos: SmolLM2, Llama 3.x, Mistral, TinyLlama, ...)
    tokenizer.model    a tiktoken rank file: base64 token + rank per line (Meta's own Llama 3 download)
    tokenizer.model    a sentencepiece model (Llama 2, Vicuna)

`load_tokenizer(model_dir)` picks the format. `tokenizer_config.json` next to it, when present, supplies the
chat template, bos/eos and add_bos_token, exactly as transformers reads them; `generation_config.json` and
`config.json` add the model's extra stop ids (Llama 3.1 instruct stops on three ids).

Chat prompts are rendered by the model's own Jinja `chat_template` in a sandboxed environment set up like
transformers' (trim_blocks, lstrip_blocks, raise_exception, strftime_now, a tojson that does not escape HTML),
so `--chat` feeds the model the very text it was fine-tuned on, default system prompts included. Models that
ship no template get the official llama2 `[INST]`, llama3 header or ChatML template, chosen by which special
tokens the vocabulary has (Vicuna's, which no file can reveal, by name: chat_template="vicuna").

`encode` recognises special-token text (`<|eot_id|>`, `<s>`, ...) as the special token, like transformers does,
so a rendered chat prompt encodes to the ids the model saw in training. `StreamDecoder` turns ids into text one
token at a time for streaming output without ever printing half a UTF-8 character.
"""
from __future__ import annotations

import base64
import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from checkpoint import UserError

# Tokens after which a model has finished its turn or its document. Only those that exist as special tokens of
# the loaded vocabulary become stop ids.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "</s>", "<|endoftext|>")

# Meta's Llama 3 tokenizer: the split regex and the 256 special tokens that follow the 128000 ranks
# (Llama 3.1+ names; ids of the ones chat uses are the same in every Llama 3 release).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]

# The official templates, verbatim from the HF repos (meta-llama/Llama-2-7b-chat-hf, Meta-Llama-3-8B-Instruct),
# Vicuna's and the plain ChatML one, so a model without its own template is prompted the way it was trained.
BUILTIN_TEMPLATES = {
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Vicuna v1.1-v1.5 ship no template; this is FastChat's "vicuna_v1.1" conversation. Chosen by name only:
    # its vocabulary is Llama 2's, so nothing in the files tells a Vicuna from a Llama 2.
    "vicuna": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = \"A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.\" %}{% endif %}"
        "{{ system_message + ' ' }}{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        "{{ 'USER: ' + message['content'] + ' ' }}{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
        " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% endif %}"
    ),
}

# The special-token variables transformers passes to every template (its `special_tokens_map`).
_TEMPLATE_TOKEN_VARS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """The interface generate/benchmark/train use. One subclass per file format, each giving `_encode`
    (text with special tokens recognised → ids, no BOS) and `_decode`."""

    kind = ""

    def __init__(self, *, special: dict[str, int], vocab_size: int, config: dict, default_bos: str | None,
                 default_eos: str | None, extra_stop_ids: Iterable[int] = (),
                 chat_template: tuple[str, str] | None = None):
        self.special = dict(special)  # text of each special/added token → id
        self.vocab_size = vocab_size
        self.bos_token = _token_text(config.get("bos_token")) or default_bos
        self.eos_token = _token_text(config.get("eos_token")) or default_eos
        self.bos_id = self.special.get(self.bos_token) if self.bos_token else None
        self.eos_id = self.special.get(self.eos_token) if self.eos_token else None
        add_bos = config.get("add_bos_token")
        self.add_bos = bool(self._default_add_bos() if add_bos is None else add_bos) and self.bos_id is not None
        stops = {self.special[t] for t in END_OF_TURN_TOKENS if t in self.special}
        stops |= {i for i in [self.eos_id, *extra_stop_ids] if i is not None and 0 <= i < vocab_size}
        self.stop_ids = frozenset(stops)
        tokens = {k: _token_text(config.get(k)) for k in _TEMPLATE_TOKEN_VARS}
        tokens.update(bos_token=self.bos_token, eos_token=self.eos_token)
        self._template_vars = {k: v for k, v in tokens.items() if v is not None}
        if chat_template is None:  # the model ships none: the official one for its vocabulary
            name = self._builtin_template_name()
            chat_template = (name, BUILTIN_TEMPLATES[name])
        self.chat_template_name, self.chat_template = chat_template  # name: "model", a built-in's name or a path
        self._compiled = None

    # --- what subclasses provide -------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        raise NotImplementedError

    def _default_add_bos(self) -> bool:
        return self.bos_id is not None

    # --- the interface -----------------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token text becomes the special token. bos=None: the tokenizer's default."""
        ids = self._encode(text)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._decode([int(i) for i in ids], skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]) as the model's template renders it."""
        import jinja2
        if not messages:
            raise UserError("cannot build a chat prompt from an empty conversation")
        # transformers drops None-valued keys (e.g. content=None from OpenAI-style APIs) before rendering.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            if self._compiled is None:
                self._compiled = _jinja_env().from_string(self.chat_template)
            return self._compiled.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self._template_vars)
        except jinja2.TemplateError as e:
            raise UserError(f"the chat template ({self.chat_template_name}) rejected the conversation: {e}")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered chat prompt; BOS is added only if the template did not render one itself."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        rendered_bos = self.bos_token is not None and text.startswith(self.bos_token)
        return self.encode(text, bos=False if rendered_bos else None)

    def _builtin_template_name(self) -> str:
        if "<|im_start|>" in self.special:
            return "chatml"
        if "<|start_header_id|>" in self.special:
            return "llama3"
        return "llama2"

    def __repr__(self):
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"stop_ids={sorted(self.stop_ids)}, chat_template={self.chat_template_name!r})")


class HFTokenizer(Tokenizer):
    """`tokenizer.json` through the `tokenizers` library (what transformers' fast tokenizers run)."""

    kind = "hf"

    def __init__(self, path: Path, config: dict, **kw):
        import tokenizers
        try:
            self.tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            raise UserError(f"cannot read {path}: {_short(e)} (download the model's tokenizer files again)")
        special = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items()}
        super().__init__(special=special, vocab_size=self.tk.get_vocab_size(with_added_tokens=True), config=config,
                         default_bos=None, default_eos=None, **kw)

    def _default_add_bos(self) -> bool:
        # No add_bos_token in tokenizer_config.json: the tokenizer.json post-processor decides, as in transformers.
        if self.bos_id is None:
            return False
        with_special = self.tk.encode("a", add_special_tokens=True).ids
        return with_special[:1] == [self.bos_id] and self.tk.encode("a", add_special_tokens=False).ids[:1] != [
            self.bos_id]

    def _encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def _decode(self, ids, skip_special):
        return self.tk.decode(ids, skip_special_tokens=skip_special)


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3 `tokenizer.model`: tiktoken BPE over bytes with the Llama 3 split regex."""

    kind = "tiktoken"
    # tiktoken panics above ~400k characters and is quadratic on very long runs without a split point, so text is
    # cut (as in Meta's reference tokenizer) before it reaches the regex.
    MAX_CHARS = 400_000
    MAX_RUN = 25_000

    def __init__(self, path: Path, config: dict, **kw):
        import tiktoken
        ranks = {}
        try:
            for line in path.read_text("ascii").splitlines():
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read tiktoken file {path}: {_short(e)} (download the tokenizer again)")
        n = len(ranks)
        special = {t: n + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=special)
        self.n_base = n
        super().__init__(special=special, vocab_size=n + len(special), config=config,
                         default_bos="<|begin_of_text|>", default_eos="<|end_of_text|>", **kw)

    def _encode(self, text):
        ids = []
        for start in range(0, len(text), self.MAX_CHARS):
            for piece in _split_long_runs(text[start:start + self.MAX_CHARS], self.MAX_RUN):
                ids += self.enc.encode(piece, allowed_special="all", disallowed_special=())
        return ids

    def _decode(self, ids, skip_special):
        if skip_special:
            ids = [i for i in ids if i < self.n_base]
        return self.enc.decode(ids)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `tokenizer.model` (Llama 2): BPE with byte fallback and a dummy-prefix space."""

    kind = "sentencepiece"

    def __init__(self, path: Path, config: dict, **kw):
        import sentencepiece
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception:
            raise UserError(f"{path} is neither a sentencepiece model nor a tiktoken rank file "
                            f"(download the model's tokenizer again)")
        n = self.sp.get_piece_size()
        # sentencepiece never matches control pieces (<s>, </s>) in text; chat templates write them as text, so
        # we cut them out first, like HF's Llama tokenizer, and encode the pieces between them separately.
        special = {self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")") \
            if special else None
        bos, eos = self.sp.bos_id(), self.sp.eos_id()
        super().__init__(special=special, vocab_size=n, config=config,
                         default_bos=self.sp.id_to_piece(bos) if bos >= 0 else None,
                         default_eos=self.sp.id_to_piece(eos) if eos >= 0 else None, **kw)

    def _encode(self, text):
        if self._split is None:
            return self.sp.encode(text)
        ids = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self.special[part])
            elif part:
                ids += self.sp.encode(part)
        return ids

    def _decode(self, ids, skip_special):
        return self.sp.decode(ids)  # sentencepiece never renders control pieces


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns only the new, complete text.

    Decoding token by token is wrong twice over: a byte-level token can end mid UTF-8 character (emoji, CJK), and
    sentencepiece drops the leading space of whatever piece comes first. So each push decodes a short window that
    starts at the last already-printed token and returns what the new tokens add to it, holding text back while it
    ends in an incomplete character (U+FFFD). The pushes of a sequence, plus `flush()`, concatenate to
    `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tok = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._prefix = 0  # window start: the first token of the last returned chunk, decoded as context
        self._read = 0    # tokens [0, _read) have been returned as text

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end is returned as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        done = self.tok.decode(self.ids[self._prefix:self._read], self.skip_special)
        text = self.tok.decode(self.ids[self._prefix:], self.skip_special)
        if final or (len(text) > len(done) and not text.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(done):]
        return ""


def load_tokenizer(path, chat_template: str | None = None) -> Tokenizer:
    """The tokenizer of the model in directory `path` (or the tokenizer file `path` itself).

    chat_template: None → the model's own (chat_template.jinja or tokenizer_config.json), else a built-in chosen
    from the vocabulary; or one of BUILTIN_TEMPLATES' names; or a path to a Jinja template file.
    """
    path = Path(path)
    if path.is_file():
        directory, candidates = path.parent, [path]
    else:
        directory = path
        candidates = [path / "tokenizer.json", path / "tokenizer.model", path / "original" / "tokenizer.model"]
    file = next((p for p in candidates if p.is_file()), None)
    if file is None:
        raise UserError(f"no tokenizer in {path}: expected tokenizer.json or tokenizer.model "
                        f"(download the model again with scripts/download.py)")
    config = _read_json(directory / "tokenizer_config.json")
    for key, value in _read_json(directory / "special_tokens_map.json").items():
        config.setdefault(key, value)
    kw = dict(chat_template=_find_chat_template(directory, config, chat_template),
              extra_stop_ids=_eos_ids(directory / "generation_config.json") + _eos_ids(directory / "config.json"))
    if file.suffix == ".json":
        return HFTokenizer(file, config, **kw)
    with open(file, "rb") as f:
        first_line = f.readline(4096)
    if re.fullmatch(rb"[A-Za-z0-9+/]+=*[ \t]+\d+\r?\n?", first_line):
        return TiktokenTokenizer(file, config, **kw)
    return SentencePieceTokenizer(file, config, **kw)


def _find_chat_template(directory: Path, config: dict, override: str | None) -> tuple[str, str] | None:
    """(name, Jinja source) of the template to use; None when the model has none."""
    if override is not None:
        if override in BUILTIN_TEMPLATES:
            return override, BUILTIN_TEMPLATES[override]
        if Path(override).is_file():
            return override, Path(override).read_text()
        raise UserError(f"unknown chat template {override!r}: use one of {', '.join(BUILTIN_TEMPLATES)} "
                        f"or a path to a Jinja template file")
    if (directory / "chat_template.jinja").is_file():  # where transformers >= 4.52 saves it
        return "model", (directory / "chat_template.jinja").read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return ("model", template) if isinstance(template, str) and template else None


@lru_cache(maxsize=None)
def _jinja_env():
    """A sandboxed environment that renders templates exactly as transformers' apply_chat_template does."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # {% generation %}...{% endgeneration %} marks assistant text for training masks; rendering keeps the body.
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, >, & for HTML, which would change the prompt text.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _split_long_runs(s: str, max_run: int):
    """Cut `s` so that no piece holds more than `max_run` consecutive whitespace or non-whitespace characters."""
    start, run, space = 0, 0, s[:1].isspace()
    for i, ch in enumerate(s):
        if ch.isspace() != space:
            space, run = not space, 1
        else:
            run += 1
            if run > max_run:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


def _token_text(value) -> str | None:
    """tokenizer_config.json stores tokens as strings or as serialized AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({_short(e)}); download the model's tokenizer files again")
    return data if isinstance(data, dict) else {}


def _eos_ids(path: Path) -> list[int]:
    eos = _read_json(path).get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    return [i for i in eos if isinstance(i, int)]


def _short(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"
