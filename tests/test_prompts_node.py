"""PCPO Prompts: text box or a .txt from ComfyUI's input folder, seeded draws, encoding cache."""
import pytest


class CountingCLIP:
    """A stand-in CLIP that records what it encodes (the node only needs tokenize + encode)."""

    def __init__(self):
        self.encoded = []

    def tokenize(self, text):
        return {"t": text}

    def encode_from_tokens_scheduled(self, tokens):
        self.encoded.append(tokens["t"])
        return [[tokens["t"], {}]]


def test_prompt_file_from_input_folder_and_seeded_draws(pcpo, comfy_dirs):
    (comfy_dirs["input"] / "train.txt").write_text("# a comment\na cat\n\na dog\na fox\n", encoding="utf-8")
    node = pcpo.nodes["PCPOPrompts"]
    assert "train.txt" in node.INPUT_TYPES()["required"]["prompt_file"][0]
    assert node.VALIDATE_INPUTS(prompt_file="train.txt") is True
    assert node.VALIDATE_INPUTS(prompt_file="../secret.txt") is not True
    clip = CountingCLIP()
    src = node().build(clip, "ignored", "train.txt", "ugly", 2, 7)[0]
    assert src.prompts == ["a cat", "a dog", "a fox"]
    d0 = src.draw(0)
    assert len(d0) == 2 and set(d0) <= set(src.prompts) and src.draw(0) == d0
    assert any(src.draw(i) != d0 for i in range(1, 6))  # iterations draw different prompts
    src.encode("a cat"), src.encode("a cat")
    assert clip.encoded == ["a cat"]  # encoded once, then cached
    with pytest.raises(ValueError, match="no prompts"):
        node().build(clip, "# only a comment\n", "(none)", "", 2, 0)


class TensorCLIP(CountingCLIP):
    """Returns a 1 KiB float32 embedding per prompt."""

    def encode_from_tokens_scheduled(self, tokens):
        import torch
        self.encoded.append(tokens["t"])
        return [[torch.zeros(1, 256), {"pooled_output": torch.zeros(0)}]]


def test_encoding_cache_is_bounded_in_bytes_least_recently_used_first(pcpo):
    clip = TensorCLIP()
    src = pcpo.nodes["PCPOPrompts"]().build(clip, "a\nb\nc\nd", "(none)", "", 2, 0)[0]
    prompts_mod = pcpo.mod("nodes.prompts")
    assert prompts_mod.tensor_bytes(src.encode("a")) == 1024
    src.cache_bytes = 3 * 1024  # room for three encodings
    for t in ("b", "c", "a", "d"):  # "a" is used again before "d" arrives: "b" is the oldest
        src.encode(t)
    assert list(src._cache) == ["c", "a", "d"] and src._cache_bytes == 3 * 1024
    src.encode("b")
    assert clip.encoded == ["a", "b", "c", "d", "b"] and src._cache_bytes <= src.cache_bytes
