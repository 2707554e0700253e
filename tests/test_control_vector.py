"""llama.cpp control vectors (GGUF): the files we write obey llama.cpp's loader's rules, read back
with the gguf package itself; a file written by hand the way repeng writes one steers a model as
a hand-written hook on the block's output does (llama.cpp's l_out); refused exports and bad files
are one-line errors naming the file."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

import steer
from checkpoint import CheckpointError
from model import ModelConfig, Transformer
from steer import SteeringVector, load_control_vector, save_control_vector

torch.set_num_threads(1)

D, LAYERS, VOCAB = 16, 4, 32
TOKENS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def tiny_model(d_model=D, n_layers=LAYERS):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=VOCAB, d_model=d_model, n_layers=n_layers,
                      n_heads=2, n_kv_heads=1, d_head=8, d_mlp=32, n_ctx=16, qkv_bias=False,
                      o_bias=False, mlp_bias=False, tie_embeddings=False, name="tiny-llama")
    model = Transformer(cfg)
    with torch.no_grad():  # larger than the default init so that every activation matters
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def random_vector(layers=(1, 3), hook="hook_resid_post", positions="all", seed=2, **kwargs):
    vector = SteeringVector(D, list(layers), hook=hook, positions=positions, **kwargs)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in vector.parameters():
            p.normal_()
    return vector


def write_gguf(path, tensors, arch="controlvector", model_hint="llama"):
    """A control vector written as repeng's export_gguf writes one: {name: numpy array}."""
    writer = GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", model_hint)
    writer.add_uint32(f"{arch}.layer_count", len(tensors))
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@contextmanager
def added_to_block_outputs(model, directions, scale=1.0):
    """The reference: scale * directions[N] added to block N's output at every position, by
    plain torch forward hooks on the blocks (no hook points, no steer.py)."""
    handles = []
    for block, direction in directions.items():
        def add(module, args, output, direction=torch.as_tensor(direction)):
            return output + scale * direction

        handles.append(model.blocks[block].register_forward_hook(add))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def logits(model, vector=None, coeff=1.0):
    if vector is None:
        return model(TOKENS)
    with vector.apply(model, coeff=coeff):
        return model(TOKENS)


# -----------------------------------------------------------------------------
# Export


def test_save_load_round_trip(tmp_path):
    vector = random_vector(layers=[1, 3], model_hint="tiny-llama")
    path = str(tmp_path / "v.gguf")
    save_control_vector(vector, path)
    loaded = load_control_vector(path, tiny_model())
    assert loaded.layers == [1, 3] and loaded.d_model == D
    assert (loaded.hook, loaded.positions, loaded.method) == ("hook_resid_post", "all",
                                                             "controlvector")
    assert loaded.model_hint == "tiny-llama"
    for layer in ("1", "3"):
        assert torch.equal(loaded.directions[layer], vector.directions[layer])
    save_control_vector(vector, path, model_hint="smollm2")
    assert load_control_vector(path).model_hint == "smollm2"


def test_written_file_obeys_the_llama_cpp_loader_rules(tmp_path):
    vector = random_vector(layers=[1, 3], model_hint="tiny-llama")
    path = str(tmp_path / "v.gguf")
    save_control_vector(vector, path)
    reader = GGUFReader(path)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "controlvector"
    assert fields["controlvector.model_hint"].contents() == "tiny-llama"
    assert fields["controlvector.layer_count"].types == [GGUFValueType.UINT32]
    assert fields["controlvector.layer_count"].contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"direction.1", "direction.3"}  # no direction.0, nothing else
    for name, tensor in tensors.items():
        assert tensor.tensor_type == GGMLQuantizationType.F32
        assert list(tensor.shape) == [D]  # 1-D, n_embd = d_model
        expected = vector.directions[name.split(".")[1]].detach().numpy()
        assert np.array_equal(np.asarray(tensor.data), expected)
    assert not list(tmp_path.glob("*.tmp*"))  # atomic: no temporary file left


def test_repeng_style_file_steers_as_adding_to_the_block_output(tmp_path):
    model = tiny_model()
    rng = np.random.default_rng(0)
    directions = {1: rng.normal(size=D).astype(np.float32),
                  3: rng.normal(size=D).astype(np.float32)}
    path = write_gguf(tmp_path / "repeng.gguf",
                      {f"direction.{n}": array for n, array in directions.items()})
    vector = load_control_vector(path, model)
    assert vector.model_hint == "llama"
    for scale in (1.0, -0.5):  # llama-cli --control-vector-scaled FILE scale
        with added_to_block_outputs(model, directions, scale), torch.no_grad():
            expected = model(TOKENS)
        assert not torch.allclose(expected, logits(model), atol=1e-2)  # it does steer
        assert torch.allclose(logits(model, vector, coeff=scale), expected, atol=1e-6, rtol=0)


def test_resid_pre_of_the_next_block_exports_as_direction_n(tmp_path):
    model = tiny_model()
    vector = random_vector(layers=[2], hook="hook_resid_pre")
    path = str(tmp_path / "v.gguf")
    save_control_vector(vector, path)
    assert [t.name for t in GGUFReader(path).tensors] == ["direction.1"]
    loaded = load_control_vector(path, model)
    assert (loaded.layers, loaded.hook) == ([1], "hook_resid_post")
    with added_to_block_outputs(model, {1: vector.directions["2"].detach()}), torch.no_grad():
        expected = model(TOKENS)
    assert torch.allclose(logits(model, vector), expected, atol=1e-6, rtol=0)
    assert torch.allclose(logits(model, loaded), expected, atol=1e-6, rtol=0)


def test_mlp_out_exports_as_the_block_output(tmp_path):
    # only the block's residual add reads hook_mlp_out: adding v there adds v to the block's output
    model = tiny_model()
    vector = random_vector(layers=[2], hook="hook_mlp_out")
    path = str(tmp_path / "v.gguf")
    save_control_vector(vector, path)
    loaded = load_control_vector(path, model)
    assert (loaded.layers, loaded.hook) == ([2], "hook_resid_post")
    with added_to_block_outputs(model, {2: vector.directions["2"].detach()}), torch.no_grad():
        expected = model(TOKENS)
    assert torch.allclose(logits(model, vector), expected, atol=1e-5, rtol=0)
    assert torch.allclose(logits(model, loaded), expected, atol=1e-6, rtol=0)


def test_from_zero_is_every_position_and_exports(tmp_path):
    path = str(tmp_path / "v.gguf")
    save_control_vector(random_vector(layers=[1], positions="from:0"), path)
    assert load_control_vector(path).layers == [1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(positions="last"), "positions='last', but llama.cpp adds a control vector at every "
                             "position: train or extract it with positions='all'"),
    (dict(positions="from:2"), "positions='from:2'"),
    (dict(positions="codename", codenames={"kzx": [3, 4]}), "positions='codename'"),
    (dict(positions="adaptive"), "positions='adaptive'"),
    (dict(layers=[0, 2]), "hook_resid_post at block 0 adds to block 0's output, which llama.cpp "
                          r"never steers \(it rejects direction.0\): use blocks >= 1"),
    (dict(layers=[0], hook="hook_mlp_out"), "hook_mlp_out at block 0 adds to block 0's output"),
    (dict(layers=[1], hook="hook_resid_pre"), "hook_resid_pre at block 1 adds to block 0's "
                                              r"output.*use blocks >= 2"),
    (dict(layers=[0], hook="hook_resid_pre"), "hook_resid_pre at block 0 adds to the embeddings"),
    (dict(layers=[2], hook="mlp.hook_out"), "mlp.hook_out is the MLP's output before Gemma's "
                                            "post-feedforward norm"),
])
def test_refused_exports_say_what_would_work(tmp_path, kwargs, message):
    path = tmp_path / "v.gguf"
    with pytest.raises(ValueError, match=r"v\.gguf: cannot export as a llama.cpp control vector: "
                                         + message) as error:
        save_control_vector(random_vector(**kwargs), str(path))
    assert "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())


# -----------------------------------------------------------------------------
# Import: llama.cpp's loader's rules, and the model's


def test_a_block_given_twice_is_summed_as_llama_cpp_does(tmp_path):
    a, b = np.ones(D, dtype=np.float32), np.arange(D, dtype=np.float32)
    path = write_gguf(tmp_path / "v.gguf", {"direction.2": a, "direction.02": b})
    vector = load_control_vector(path)
    assert vector.layers == [2]
    assert torch.equal(vector.directions["2"].detach(), torch.from_numpy(a + b))


def direction(n=D, dtype=np.float32, shape=None):
    return np.linspace(-1, 1, n).astype(dtype).reshape(shape or (n,))


@pytest.mark.parametrize("tensors, arch, message", [
    ({"direction.1": direction(), "token_embd.weight": direction()}, "controlvector",
     r"tensor 'token_embd.weight' is not a direction.N \(llama.cpp rejects any other tensor\)"),
    ({"direction.1.bias": direction()}, "controlvector", "tensor 'direction.1.bias' is not a"),
    ({"direction.1": direction(dtype=np.float16)}, "controlvector",
     "direction.1 is F16, llama.cpp reads only F32 directions"),
    ({"direction.1": direction(n=2 * D, shape=(2, D))}, "controlvector",
     "direction.1 has shape 16x2, llama.cpp reads only 1-D directions"),
    ({"direction.0": direction(), "direction.1": direction()}, "controlvector",
     "direction.0: llama.cpp never steers block 0's output and rejects the file"),
    ({"direction.1": direction(), "direction.2": direction(n=D + 1)}, "controlvector",
     r"direction.2 has 17 values but direction.1 has 16 \(one n_embd per file\)"),
    ({}, "controlvector", "no direction.N tensors"),
    ({"direction.1": direction()}, "llama",
     "general.architecture is 'llama', not 'controlvector': not a control vector"),
])
def test_files_llama_cpp_rejects_are_one_line_errors(tmp_path, tensors, arch, message):
    path = write_gguf(tmp_path / "bad.gguf", tensors, arch=arch)
    with pytest.raises(CheckpointError, match=r"bad\.gguf: " + message) as error:
        load_control_vector(path)
    assert "\n" not in str(error.value)


def test_trailing_unit_dimensions_are_1d_for_llama_cpp(tmp_path):
    # ggml counts dimensions up to the last one > 1: n_embd x 1 is 1-D to llama.cpp's loader
    path = write_gguf(tmp_path / "v.gguf", {"direction.1": direction(shape=(1, D))})
    assert torch.equal(load_control_vector(path).directions["1"].detach(),
                       torch.from_numpy(direction()))


def test_a_vector_that_does_not_fit_the_model_is_a_one_line_error(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", {"direction.1": direction()})
    with pytest.raises(ValueError, match=r"v\.gguf: vector has d_model=16 but the model has "
                                         "d_model=24"):
        load_control_vector(path, tiny_model(d_model=24))
    path = write_gguf(tmp_path / "far.gguf", {"direction.4": direction()})
    with pytest.raises(ValueError, match=r"far\.gguf: vector steers layers \[4\] out of range: "
                                         r"the model has layers 0\.\.3"):
        load_control_vector(path, tiny_model())


def test_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing.gguf: no such control vector file"):
        load_control_vector(str(tmp_path / "missing.gguf"))
    text = tmp_path / "text.gguf"
    text.write_text("not a gguf file\n")
    with pytest.raises(CheckpointError, match=r"text\.gguf: not a GGUF file"):
        load_control_vector(str(text))
    path = str(tmp_path / "v.gguf")
    save_control_vector(random_vector(), path)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(CheckpointError, match=r"truncated\.gguf: corrupt GGUF file"):
        load_control_vector(str(truncated))


# -----------------------------------------------------------------------------
# Command line


def test_command_line_export_and_import(tmp_path, capsys):
    vector = random_vector(layers=[2], hook="hook_resid_pre", model_hint="tiny-llama")
    vector.save(str(tmp_path / "steering_vector.safetensors"))
    steer.main(["export", str(tmp_path / "steering_vector.safetensors"),
                str(tmp_path / "v.gguf"), "--model-hint", "llama"])
    printed = capsys.readouterr().out
    assert "v.gguf: direction.1 (added to the output of blocks [1]), d_model 16" in printed
    steer.main(["import", str(tmp_path / "v.gguf"), str(tmp_path / "back.safetensors")])
    back = SteeringVector.load(str(tmp_path / "back.safetensors"))
    assert (back.layers, back.hook, back.method, back.model_hint) == (
        [1], "hook_resid_post", "controlvector", "llama")
    assert torch.equal(back.directions["1"], vector.directions["2"])
    with pytest.raises(SystemExit, match=r"error: .*bad\.gguf: cannot export.*positions='last'"):
        random_vector(positions="last").save(str(tmp_path / "last.safetensors"))
        steer.main(["export", str(tmp_path / "last.safetensors"), str(tmp_path / "bad.gguf")])
