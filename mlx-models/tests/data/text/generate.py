"""Writes the expectations that the text-side tests of mlx-models compare against.

Everything here comes from the Python reference implementations, never from our Rust code:

* `tokenizer_ids.json`: ids and decoded text from the `tokenizers` library for the committed
  tokenizer.json files, and from Transformers' `AutoTokenizer` where it agrees.
* `vocab_ids.json`: ids for tokenizers built from GGUF-style metadata, from Transformers'
  own GGUF loader (a GGUF file holding only the tokenizer metadata is written and loaded with
  `AutoTokenizer.from_pretrained(dir, gguf_file=...)`).
* `chat_templates.json`: renders of chat templates by Transformers' `render_jinja_template`.
* `strftime.json`: `time.strftime` on fixed UTC timestamps.

Run with the Transformers virtual environment (transformers 5.x, tokenizers, gguf):

    ~/.cache/mlx-models/pyenv-transformers/bin/python mlx-models/tests/data/text/generate.py
"""

import json
import os
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOKENIZERS = HERE.parent / "tokenizers"

TEXTS = [
    "Hello world",
    "Hello, world! How are you?",
    "Café naïve façade — résumé, Ångström, Łódź",
    "你好，世界。日本語のテキスト、한국어 문장",
    "I ❤️ 🦀 and 👍🏽!",
    "👨‍👩‍👧‍👦 family 🏳️‍🌈 flag",
    "line1\nline2\r\n\tindented  double  spaces   \n\n",
    "1234567 3.14159 and 2024-05-01",
    "I'm sure they'll say it's fine, DON'T",
    "  leading spaces",
    "fn main() {\n    println!(\"hi\");\n}",
    "<|endoftext|> after the end",
    "<s> hi </s>",
    "singing in the morning, winning",
    "",
    " ",
]


def dump(name, value):
    (HERE / name).write_text(json.dumps(value, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def tokenizer_ids():
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    out = {}
    for name in ["gpt2", "llama2"]:
        path = TOKENIZERS / name
        fast = Tokenizer.from_file(str(path / "tokenizer.json"))
        auto = AutoTokenizer.from_pretrained(str(path))
        cases = []
        for text in TEXTS:
            with_special = fast.encode(text, add_special_tokens=True).ids
            without = fast.encode(text, add_special_tokens=False).ids
            cases.append(
                {
                    "text": text,
                    "ids": with_special,
                    "ids_no_special": without,
                    "decoded": fast.decode(with_special, skip_special_tokens=False),
                    "decoded_skip_special": fast.decode(with_special, skip_special_tokens=True),
                    # Transformers 5 rebuilds some tokenizer classes (LlamaTokenizer) from the
                    # vocabulary instead of using tokenizer.json's normalizer/pre-tokenizer.
                    "transformers_agrees": auto(text)["input_ids"] == with_special,
                }
            )
        out[name] = cases
    dump("tokenizer_ids.json", out)


def write_gguf(path, spec):
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(spec["tokens"]))
    w.add_tokenizer_model(spec["model"])
    if spec.get("pre"):
        w.add_tokenizer_pre(spec["pre"])
    w.add_token_list(spec["tokens"])
    if spec.get("merges") is not None:
        w.add_token_merges(spec["merges"])
    if spec.get("scores") is not None:
        w.add_token_scores(spec["scores"])
    w.add_token_types(spec["token_types"])
    if spec.get("bos") is not None:
        w.add_bos_token_id(spec["bos"])
    if spec.get("eos") is not None:
        w.add_eos_token_id(spec["eos"])
    if spec.get("unk") is not None:
        w.add_unk_token_id(spec["unk"])
    if spec.get("add_bos") is not None:
        w.add_add_bos_token(spec["add_bos"])
    w.add_tensor("token_embd.weight", np.zeros((len(spec["tokens"]), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def by_id(vocab):
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    return tokens


def gpt2_spec(pre, add_bos=None, user_defined=()):
    """GPT-2's vocabulary as a GGUF would hold it (the Rust test derives the same spec)."""
    t = json.loads((TOKENIZERS / "gpt2" / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = by_id(t["model"]["vocab"])
    types = [1] * len(tokens)
    types[50256] = 3
    for token in user_defined:
        types[tokens.index(token)] = 4
    return {
        "model": "gpt2",
        "pre": pre,
        "tokens": tokens,
        "merges": t["model"]["merges"],
        "token_types": types,
        "bos": 50256,
        "eos": 50256,
        "add_bos": add_bos,
    }


def llama_spec():
    """The SentencePiece vocabulary with made-up scores: -id for normal pieces, 0 otherwise."""
    t = json.loads((TOKENIZERS / "llama2" / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = by_id(t["model"]["vocab"])
    types, scores = [], []
    for index, token in enumerate(tokens):
        if index == 0:
            types.append(2)
        elif index in (1, 2):
            types.append(3)
        elif token.startswith("<0x") and token.endswith(">") and len(token) == 6:
            types.append(6)
        else:
            types.append(1)
        scores.append(-float(index) if types[-1] == 1 else 0.0)
    return {
        "model": "llama",
        "tokens": tokens,
        "scores": scores,
        "token_types": types,
        "bos": 1,
        "eos": 2,
        "unk": 0,
    }


def vocab_ids():
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    cases = {
        "gpt2": gpt2_spec("gpt2"),
        "gpt2-add-bos": gpt2_spec("gpt2", add_bos=True),
        "gpt2-user-defined": gpt2_spec("gpt2", user_defined=["ing"]),
        "llama-bpe": gpt2_spec("llama-bpe"),
        "qwen2": gpt2_spec("qwen2"),
        "qwen35": gpt2_spec("qwen35"),
        "gpt-4o": gpt2_spec("gpt-4o"),
        "tekken": gpt2_spec("tekken"),
        "smollm": gpt2_spec("smollm"),
        "llama": llama_spec(),
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in cases.items():
            path = Path(tmp) / f"{name}.gguf"
            write_gguf(path, spec)
            tok = AutoTokenizer.from_pretrained(tmp, gguf_file=path.name)
            note = "transformers GGUF loader"
            if name == "smollm":
                # Transformers 5 has no entry for llama.cpp's `smollm` pre-tokenizer and falls back to
                # plain GPT-2 splitting. llama.cpp splits every digit first (`\p{N}`) and then applies
                # the GPT-2 regex, which is what SmolLM2's own tokenizer.json spells as
                # Sequence[Digits(individual_digits), ByteLevel]. That is the reference here.
                tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                    [
                        pre_tokenizers.Digits(individual_digits=True),
                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                    ]
                )
                note = "transformers GGUF loader with SmolLM2's tokenizer.json pre-tokenizer"
            out[name] = {
                "reference": note,
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "vocab_size": len(tok),
                "cases": [
                    {
                        "text": text,
                        "ids": tok(text)["input_ids"],
                        "decoded": tok.decode(tok(text)["input_ids"], skip_special_tokens=False),
                    }
                    for text in TEXTS
                ],
            }
    dump("vocab_ids.json", out)


SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA31 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3 = """{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "system" %}
        {{- '<|im_start|>system\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

LOOP_CONTROLS = """{% for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% if loop.index > 4 %}{% break %}{% endif %}
[{{ loop.index }}/{{ loop.length }}:{{ m.role|upper }}] {% if m.content is string %}{{ m.content|trim }}{% else %}{% for part in m.content %}{% if part.type == 'text' %}{{ part.text }}{% endif %}{% endfor %}{% endif %}

{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}
"""

GENERATION_BLOCK = """{% for message in messages %}
    {% if message.role == 'assistant' %}
<|assistant|>
{% generation %}
{{ message.content }}{{ eos_token }}
{% endgeneration %}
    {% else %}
<|{{ message.role }}|>
{{ message.content }}
    {% endif %}
{% endfor %}
{%- if add_generation_prompt %}<|assistant|>
{% endif %}
"""

ALTERNATING = """{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"""

TOJSON = """{{ data|tojson }}
{{ data|tojson(indent=2) }}
{{ data|tojson(ensure_ascii=True) }}
{{ data|tojson(sort_keys=True) }}
{{ data|tojson(separators=(",", ":")) }}
{{ data|tojson(indent="\\t", sort_keys=True) }}
{{ "plain <b>&'\\""|tojson }}
{{ [1, 2.5, none, true]|tojson(indent=0) }}
{{ {}|tojson }}{{ []|tojson(indent=2) }}
"""

PYTHONISMS = """{{ none }}|{{ true }}|{{ false }}|{{ 1.5 }}|{{ 2.0 }}|{{ 10 / 4 }}|{{ 7 // 2 }}|{{ 7 % 3 }}|{{ 2 ** 10 }}
{{ "hello world".title() }}|{{ "  x  ".strip() }}|{{ "a,b,c".split(",")|join("+") }}|{{ "Hello".startswith("He") }}|{{ "Hello".endswith("x") }}
{{ "ab" * 3 }}|{{ "abc"[::-1] }}|{{ messages|length }}|{{ messages[-1].content|upper }}|{{ "x" in "xyz" }}|{{ [3, 1, 2]|sort|list }}
{{ "%s=%d"|format("n", 5) }}|{{ "Hi %s" % "there" if false else "Hi" }}|{{ range(3)|list }}|{{ messages|map(attribute="role")|join(",") }}
{% for key, value in extra.items() %}{{ key }}={{ value }};{% endfor %}|{{ extra.get("missing", "fallback") }}|{{ "b" in extra }}
{{ [1, "two", none, true, 1.5] }}|{{ {"k": "v", "n": none} }}|{{ ("a", 1) }}
"""


def chat_templates():
    from transformers.utils.chat_template_utils import render_jinja_template

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_current_weather",
                "description": "Get the current weather in a given location — « quoted » & <escaped>",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                        "days": {"type": "integer", "minimum": 1, "maximum": 14, "default": 3},
                        "threshold": {"type": "number", "default": 0.5},
                    },
                    "required": ["location"],
                },
            },
        }
    ]
    chat = [
        {"role": "system", "content": "  You are a helpful assistant.\n"},
        {"role": "user", "content": "Hi there! Ça va? 你好 👋"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "What's the weather like in Paris?"},
    ]
    tool_chat = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the weather like in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_current_weather",
                        "arguments": {"location": "Paris, France", "unit": "celsius", "days": 2, "threshold": 1e-05},
                    },
                }
            ],
        },
        {"role": "tool", "content": "{\"temperature\": 22.5, \"condition\": \"sunny\"}"},
        {"role": "user", "content": "Thanks!"},
    ]
    reasoning_chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nEasy: 2+2=4.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6", "reasoning": "3+3 is six."},
    ]
    parts_chat = [
        {"role": "system", "content": "hidden system"},
        {"role": "user", "content": [{"type": "text", "text": "Describe "}, {"type": "image"}, {"type": "text", "text": "this."}]},
        {"role": "assistant", "content": "  A cat.  "},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "Fifth, cut by break"},
    ]
    data = {
        "name": "José «q» \"dq\" back\\slash\nnew\ttab\u0001ctl \u007f del 🦀",
        "numbers": [0, -7, 3.25, 1e-07, 1e16, 123456789012.0, 2.0, -0.0, 0.1],
        "nested": {"z": {"b": [], "a": {}}, "a": [True, False, None]},
        "keys": {"b": 1, "a": 2, "C": 3},
    }
    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    cases = [
        ("smollm2", SMOLLM2, chat[1:], {}, True, {}),
        ("smollm2-with-system", SMOLLM2, chat, {}, False, {}),
        ("llama31", LLAMA31, chat, {}, True, {"bos_token": "<|begin_of_text|>", "date_string": "26 Jul 2024"}),
        ("llama31-tools", LLAMA31, tool_chat, {"tools": tools}, True, {"bos_token": "<|begin_of_text|>", "date_string": "05 Jan 2025"}),
        ("llama31-tools-in-system", LLAMA31, tool_chat, {"tools": tools}, False, {"bos_token": "<|begin_of_text|>", "date_string": "05 Jan 2025", "tools_in_user_message": False}),
        ("llama31-two-tool-calls", LLAMA31, [tool_chat[1], dict(tool_chat[2], tool_calls=tool_chat[2]["tool_calls"] * 2)], {}, False, {"bos_token": "<|begin_of_text|>", "date_string": "05 Jan 2025"}),
        ("qwen25", QWEN25, chat, {}, True, {}),
        ("qwen25-tools", QWEN25, tool_chat, {"tools": tools}, True, {}),
        ("qwen3-reasoning", QWEN3, reasoning_chat, {}, True, {"enable_thinking": False}),
        ("qwen3-thinking", QWEN3, reasoning_chat[:4], {}, True, {}),
        ("loop-controls", LOOP_CONTROLS, parts_chat, {}, True, {}),
        ("generation-block", GENERATION_BLOCK, chat, {}, True, specials),
        ("alternating-ok", ALTERNATING, chat[1:], {}, False, specials),
        ("alternating-error", ALTERNATING, chat, {}, False, specials),
        ("tojson", TOJSON, chat[:1], {}, False, {"data": data}),
        ("pythonisms", PYTHONISMS, chat, {}, False, {"extra": {"a": 1, "b": "two"}}),
    ]
    out = []
    for name, template, messages, tool_kwargs, add_generation_prompt, kwargs in cases:
        case = {
            "name": name,
            "template": template,
            "messages": messages,
            "tools": tool_kwargs.get("tools"),
            "add_generation_prompt": add_generation_prompt,
            "kwargs": kwargs,
        }
        try:
            rendered, _ = render_jinja_template(
                conversations=[json.loads(json.dumps(messages))],
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                tools=tool_kwargs.get("tools"),
                **kwargs,
            )
            case["expected"] = rendered[0]
        except Exception as error:  # the template's own raise_exception
            case["expected_error"] = str(error)
        out.append(case)
    dump("chat_templates.json", out)


def strftime():
    timestamps = [0, 951782400, 1721995200, 1736035199, 4102444800 + 86399]
    formats = ["%d %b %Y", "%B %d, %Y", "%Y-%m-%d %H:%M:%S", "%A %a %j %y %I %p %%", "%-d/%-m %e|%H", "%b %-d", "plain"]
    out = [
        {"timestamp": ts, "format": fmt, "expected": time.strftime(fmt, time.gmtime(ts))}
        for ts in timestamps
        for fmt in formats
    ]
    dump("strftime.json", out)


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    tokenizer_ids()
    vocab_ids()
    chat_templates()
    strftime()
