"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with DeepSeek's special tokens."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from ..io.atomic import atomic_write_text

# DeepSeek spells its specials with full-width bars (U+FF5C) and U+2581 instead of spaces. The order here is the
# id order `train_tokenizer` gives them (bos 0, eos 1, ...); loaded tokenizers are searched by content instead.
SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<\uff5cbegin\u2581of\u2581sentence\uff5c>",
    "eos": "<\uff5cend\u2581of\u2581sentence\uff5c>",
    "pad": "<\uff5c\u2581pad\u2581\uff5c>",
    "fim_begin": "<\uff5cfim\u2581begin\uff5c>",
    "fim_hole": "<\uff5cfim\u2581hole\uff5c>",
    "fim_end": "<\uff5cfim\u2581end\uff5c>",
    "user": "<\uff5cUser\uff5c>",
    "assistant": "<\uff5cAssistant\uff5c>",
    "think": "<think>",
    "think_end": "</think>",
    "answer": "<answer>",
    "answer_end": "</answer>",
    # DeepSeek-V3's tool-call tokens (its tokenizer_config.json chat template; nanoseek.infer.tools)
    "tool_calls_begin": "<\uff5ctool\u2581calls\u2581begin\uff5c>",
    "tool_calls_end": "<\uff5ctool\u2581calls\u2581end\uff5c>",
    "tool_call_begin": "<\uff5ctool\u2581call\u2581begin\uff5c>",
    "tool_call_end": "<\uff5ctool\u2581call\u2581end\uff5c>",
    "tool_sep": "<\uff5ctool\u2581sep\uff5c>",
    "tool_outputs_begin": "<\uff5ctool\u2581outputs\u2581begin\uff5c>",
    "tool_outputs_end": "<\uff5ctool\u2581outputs\u2581end\uff5c>",
    "tool_output_begin": "<\uff5ctool\u2581output\u2581begin\uff5c>",
    "tool_output_end": "<\uff5ctool\u2581output\u2581end\uff5c>",
}

TOKENIZER_CONFIG = "tokenizer_config.json"

# DeepSeek-V3's chat layout as a Jinja template for transformers' `apply_chat_template` (the same string as
# nanoseek.infer.chat.render_chat, tested): bos, the system messages joined by a blank line (then the `# Tools`
# section of `tools=`, see nanoseek.infer.tools), `<｜User｜>text` per user turn,
# `<｜Assistant｜>text[calls block]<｜end▁of▁sentence｜>` per assistant turn (only what follows its last `</think>`,
# as R1's template), `tool` messages as V3's tool outputs block, then `<｜Assistant｜>` as the generation prompt
# (none after tool outputs: their `<｜tool▁outputs▁end｜>` is the prompt, as V3's template).
_CALL = ("'<｜tool▁call▁begin｜>function<｜tool▁sep｜>' + c['function']['name'] + '\\n```json\\n' + "
         "(c['function']['arguments'] if c['function']['arguments'] is string else c['function']['arguments'] "
         "| tojson) + '\\n```<｜tool▁call▁end｜>'")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system=[], outputs=false) %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = ns.system + [m['content']] %}"
    "{% endif %}{% endfor %}{{ ns.system | join('\\n\\n') }}"
    "{% if tools %}{% if ns.system %}{{ '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{% for t in tools %}{{ '\\n' + (t | tojson) }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor function call returns, you should first print <｜tool▁calls▁begin｜>\\nFor each "
    "function call, you should return object like:\\n<｜tool▁call▁begin｜>function<｜tool▁sep｜><function_name>\\n"
    "```json\\n<function_arguments_in_json_format>\\n```<｜tool▁call▁end｜>\\nAt the end of function call returns, "
    "you should print <｜tool▁calls▁end｜>' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] in ['user', 'assistant'] and ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% if not ns.outputs %}{{ '<｜Assistant｜>' }}{% endif %}"
    "{% if m['content'] %}{{ m['content'].split('</think>')[-1] }}{% endif %}"
    "{% if m['tool_calls'] %}{{ '<｜tool▁calls▁begin｜>' }}{% for c in m['tool_calls'] %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}{{ " + _CALL + " }}{% endfor %}{{ '<｜tool▁calls▁end｜>' }}"
    "{% endif %}{{ eos_token }}"
    "{% elif m['role'] == 'tool' %}{{ '\\n' if ns.outputs else '<｜tool▁outputs▁begin｜>' }}"
    "{{ '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' }}{% endif %}"
    "{% if m['role'] != 'system' %}{% set ns.outputs = m['role'] == 'tool' %}{% endif %}{% endfor %}"
    "{% if ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}{% elif add_generation_prompt %}{{ '<｜Assistant｜>' }}"
    "{% endif %}"
)
# What a tokenizer without the tool tokens (an older nanoseek checkpoint) renders instead of a tools conversation.
_NO_TOOLS = ("{% if tools or messages | selectattr('role', 'equalto', 'tool') | list or messages | "
             "selectattr('tool_calls') | list %}{{ raise_exception('this tokenizer has no tool-call tokens "
             "(<｜tool▁calls▁begin｜>, ...): it cannot render tools or tool calls') }}{% endif %}")

# Fallback spellings so that non-DeepSeek tokenizer.json files (GPT-2, Llama, ...) still load.
_FALLBACKS: dict[str, tuple[str, ...]] = {
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"),
    "pad": ("<pad>", "<|pad|>"),
}

# Pre-tokenisation as DeepSeek-V3's released tokenizer.json (llama.cpp's "deepseek-v3" pre-tokenizer): splits applied
# in turn, each match isolated: digits in runs of at most three; CJK runs; then a word with at most one leading
# non-letter (a space, or one punctuation mark before ASCII letters: `_bar`, `.attr`), punctuation runs that absorb
# trailing newlines, newline runs, and whitespace runs that leave their last space to the next word. A GGUF export
# therefore tokenises in llama.cpp exactly as here.
DEEPSEEK_V3_SPLITS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r'''[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*'''
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
)


def _canonical_hash(json_text: str) -> str:
    canonical = json.dumps(json.loads(json_text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of DeepSeek's special tokens, found by their content.

    `encode` never adds bos/eos. Ids of specials the vocabulary lacks are None (bos/eos are required)."""

    def __init__(self, backend: HFTokenizer) -> None:
        self.backend = backend
        self._plain: HFTokenizer | None = None  # copy that encodes special-token strings as ordinary text
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1 if vocab else 0
        self.special_ids: dict[str, int] = {}
        for name, content in SPECIAL_TOKENS.items():
            tid = backend.token_to_id(content)
            if tid is None:
                for alt in _FALLBACKS.get(name, ()):
                    tid = backend.token_to_id(alt)
                    if tid is not None:
                        break
            if tid is not None:
                self.special_ids[name] = tid
        if "eos" not in self.special_ids:
            raise ValueError(
                f"tokenizer has no end-of-sentence token (looked for {SPECIAL_TOKENS['eos']!r} and "
                f"{', '.join(_FALLBACKS['eos'])})"
            )
        self.special_ids.setdefault("bos", self.special_ids["eos"])  # GPT-2 style: one token for both
        self.bos_id: int = self.special_ids["bos"]
        self.eos_id: int = self.special_ids["eos"]
        self.pad_id: int | None = self.special_ids.get("pad")
        self.fim_begin_id: int | None = self.special_ids.get("fim_begin")
        self.fim_hole_id: int | None = self.special_ids.get("fim_hole")
        self.fim_end_id: int | None = self.special_ids.get("fim_end")
        self.hash: str = _canonical_hash(backend.to_str())

    # ------------------------------------------------------------------------------------------ files
    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load any tokenizer.json (ours, DeepSeek's, ...) without modifying it."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json there")
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json atomically (a directory gets `tokenizer.json` inside it) and, beside it,
        tokenizer_config.json (`hf_config`), so `transformers.AutoTokenizer.from_pretrained(folder)` and the tools
        built on it (lm-eval's hf model, vLLM) get the special tokens and the chat template."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        atomic_write_text(path, self.backend.to_str(pretty=True))
        atomic_write_text(path.with_name(TOKENIZER_CONFIG),
                          json.dumps(self.hf_config(model_max_length), indent=2, ensure_ascii=False) + "\n")

    def hf_config(self, model_max_length: int | None = None) -> dict:
        """tokenizer_config.json as DeepSeek's releases write it: bos / eos / pad tokens, bos added by default (the
        tokenizer.json's post-processor does it for transformers 5; `add_bos_token` for older readers), the chat
        template (CHAT_TEMPLATE with this tokenizer's spellings). nanoseek's own `encode` never adds bos."""
        tok = self.id_to_token
        chat = {k: tok(self.special_ids[k]) for k in ("user", "assistant") if k in self.special_ids}
        cfg = {
            "add_bos_token": True, "add_eos_token": False, "bos_token": tok(self.bos_id), "eos_token": tok(self.eos_id),
            "pad_token": tok(self.pad_id) if self.pad_id is not None else tok(self.eos_id),
            "clean_up_tokenization_spaces": False, "legacy": True, "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length or 1 << 30,
        }
        if len(chat) == 2:  # a chat template needs the turn markers
            think = self.special_ids.get("think_end")
            template = CHAT_TEMPLATE.replace("<｜User｜>", chat["user"]).replace("<｜Assistant｜>", chat["assistant"])
            if not all(k in self.special_ids for k in SPECIAL_TOKENS if k.startswith("tool_")):
                template = _NO_TOOLS + template
            cfg["chat_template"] = template.replace("</think>", tok(think) if think is not None else "</think>")
        return cfg

    # ------------------------------------------------------------------------------------------ coding
    def _backend(self, allow_special: bool) -> HFTokenizer:
        if allow_special:
            return self.backend
        if self._plain is None:
            plain = HFTokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; no bos/eos added. With allow_special=False, special-token strings occurring in the
        text (e.g. a literal "<think>") are encoded as ordinary text instead of as the special id."""
        return self._backend(allow_special).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], allow_special: bool = True) -> list[list[int]]:
        """`encode` over many texts, in parallel."""
        encs = self._backend(allow_special).encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Text of `ids` (a list, numpy array or tensor); with skip_special, special tokens are left out."""
        seq = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self.backend.decode(seq, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, tid: int) -> str | None:
        return self.backend.id_to_token(tid)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash}, specials={len(self.special_ids)})"


def _empty_bpe() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in DEEPSEEK_V3_SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE on `texts`. The specials come first (bos id 0, eos id 1, ...), then the 256 bytes;
    `vocab_size` counts all of them (the result can be smaller if the corpus runs out of merges)."""
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small: need at least {minimum} (specials + 256 bytes)")
    tok = _empty_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos"]  # for transformers' tokenizer: bos first, as DeepSeek's (nanoseek's encode adds none)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    out = Tokenizer(tok)
    assert out.bos_id == 0 and out.eos_id == 1
    return out
