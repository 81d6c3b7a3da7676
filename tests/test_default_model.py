"""The default model as a user meets it: SmolLM2-135M-Instruct's GGUF from the installed
package, in the default config's layout, behind the real Ray Serve app; greedy chat
completions through the official openai client equal transformers' `generate` on the same
file, token for token."""

import openai
import pytest
import torch

from deploy.default_model import default_config
from tests.servers import serve_app

pytestmark = pytest.mark.slow
# (question, max_tokens): answers that end at <|im_end|> and one cut by the length limit
CHATS = [
    ("What is the capital of France?", 32),
    ("Name the three primary colors.", 40),
    ("Write a Python function that returns the square of a number.", 24),
]


@pytest.fixture(scope="module")
def server(ray_cluster_2x2, smollm2_gguf):
    config = default_config()
    assert config.model == str(smollm2_gguf)
    with serve_app(config.model_dump()) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), config.served_model_name


def hf_greedy(model, tokenizer, question: str, max_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, generated ids) of transformers' greedy generate, stopping at EOS like the server."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    ids = torch.tensor([prompt])
    with torch.no_grad():  # an explicit mask: the prompt holds the pad token (<|im_end|>), not padding
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return prompt, out[0, len(prompt):].tolist()


@pytest.mark.parametrize("question,max_tokens", CHATS)
def test_greedy_chat_equals_transformers_generate(server, smollm2_reference, smollm2_tokenizer, question, max_tokens):
    client, name = server
    prompt, want = hf_greedy(smollm2_reference, smollm2_tokenizer, question, max_tokens)
    got = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                         max_tokens=max_tokens, temperature=0, logprobs=True)
    choice = got.choices[0]
    print(f"\n{question!r} -> {choice.message.content!r} ({choice.finish_reason})")
    assert [t.token for t in choice.logprobs.content] == [smollm2_tokenizer.decode([i]) for i in want]
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(prompt), len(want))
    assert choice.message.content == smollm2_tokenizer.decode(want, skip_special_tokens=True)
    ended = want[-1] == smollm2_tokenizer.eos_token_id
    assert choice.finish_reason == ("stop" if ended else "length")


def test_the_default_model_knows_the_capital_of_france(server):
    client, name = server
    assert [m.id for m in client.models.list().data] == [name] == ["SmolLM2-135M-Instruct"]
    stream = client.chat.completions.create(model=name, temperature=0, max_tokens=32, stream=True,
                                            messages=[{"role": "user", "content": "What is the capital of France?"}])
    answer = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert "Paris" in answer, answer
