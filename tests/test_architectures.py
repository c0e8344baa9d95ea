"""Architectures nobody in this project wrote, recorded with defaults: GPT-2's (inputs, outputs) ``Conv1D``
weights, the layer graph learnt from the forward pass (pathways chain only along real Linear edges,
"dead" judged only before a real ReLU), and a module called twice in one pass recorded per call.

Reference values come from the test's own hooks and the modules' parameters, computed with numpy.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close, class_means, numpy_stats
from torch import nn

from nn_staining import NetworkTrace, load_trace
from nn_staining import staining as st
from nn_staining.catalog import TraceCorruptError

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
)

CLASSES = 3


def class_data(n: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs whose class c shifts feature c up by 1.5."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = torch.randn(n, features, generator=g)
    x[torch.arange(n), y] += 1.5
    return x, y


# -- (a) weights kept as (inputs, outputs) -------------------------------------------------------------
def tiny_gpt2() -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, num_labels=CLASSES, pad_token_id=0
    )
    return GPT2ForSequenceClassification(config)


def test_gpt2_conv1d_weights_are_stored_one_row_per_output_neuron(tmp_path: Path) -> None:
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (24, 6), generator=g)
    y = torch.randint(0, CLASSES, (24,), generator=g)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    conv1d = {
        "L_transformer.h.0.attn.c_attn": model.transformer.h[0].attn.c_attn,  # 16 inputs, 48 outputs
        "L_transformer.h.0.attn.c_proj": model.transformer.h[0].attn.c_proj,  # square: 16 x 16
        "L_transformer.h.0.mlp.c_fc": model.transformer.h[0].mlp.c_fc,  # 16 inputs, 64 outputs
        "L_transformer.h.0.mlp.c_proj": model.transformer.h[0].mlp.c_proj,  # 64 inputs, 16 outputs
    }
    snapshots: list[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        for epoch in range(2):
            trace.start_epoch(epoch)
            for start in range(0, 24, 8):
                trace.set_targets(y[start : start + 8])
                loss = model(input_ids=ids[start : start + 8], labels=y[start : start + 8]).loss
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            snapshots.append(
                {
                    key: (
                        m.weight.detach().double().numpy().copy(),
                        m.weight.grad.detach().double().numpy().copy(),
                        m.bias.detach().double().numpy().copy(),
                    )
                    for key, m in conv1d.items()
                }
            )
            trace.end_epoch()
    t = load_trace(tmp_path / "t")
    for key, module in conv1d.items():
        assert t.layer_info(key)["has_weights"], key
        assert t.layer_info(key)["neurons"] == module.nf
        for epoch, snapshot in enumerate(snapshots):
            weight, grad, bias = snapshot[key]  # (inputs, outputs)
            np.testing.assert_array_equal(t.weights(epoch, key), weight.T.astype(np.float32))
            frame = t.query(
                f"E_{epoch}/{key}", columns=["weight_norm", "grad_norm", "bias", "weight_delta_norm"]
            )
            np.testing.assert_allclose(frame["weight_norm"], np.linalg.norm(weight, axis=0), rtol=1e-5)
            np.testing.assert_allclose(frame["grad_norm"], np.linalg.norm(grad, axis=0), rtol=1e-5)
            np.testing.assert_allclose(frame["bias"], bias, rtol=1e-6)
            if epoch:
                delta = np.linalg.norm(weight - snapshots[epoch - 1][key][0], axis=0)
                np.testing.assert_allclose(frame["weight_delta_norm"], delta, rtol=1e-4, atol=1e-7)


# -- (b) the layer graph: pathways -----------------------------------------------------------------------
BERT_SELF = "L_bert.encoder.layer.0.attention.self"


def identity_graph(model: nn.Module, layers: list[str], run) -> dict[str, list[str]]:
    """The test's own graph: hooks on the recorded modules note, in one pass without autograd, which
    recorded module's output object each tensor argument is (the latest module to return it wins)."""
    named = dict(model.named_modules())
    outputs: dict[int, tuple[torch.Tensor, str]] = {}  # the tensors are kept alive: ids stay unique
    graph: dict[str, list[str]] = {}

    def hook(key: str):
        def record(module: nn.Module, args: tuple, output) -> None:
            out = output if isinstance(output, torch.Tensor) else output[0]
            found = [outputs[id(a)][1] for a in args if isinstance(a, torch.Tensor) and id(a) in outputs]
            graph.setdefault(key, [])
            graph[key] += [f for f in found if f not in graph[key]]
            outputs[id(out)] = (out, key)

        return record

    handles = [named[key[2:]].register_forward_hook(hook(key)) for key in layers]
    with torch.no_grad():
        run()
    for handle in handles:
        handle.remove()
    return graph


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT trained for one epoch of 3 batches; its trace and the test's own identity graph."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=CLASSES,
    )
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (24, 8), generator=g)
    y = torch.randint(0, CLASSES, (24,), generator=g)
    store = tmp_path_factory.mktemp("bert") / "run"
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    with NetworkTrace(model, store, num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        for start in range(0, 24, 8):
            trace.set_targets(y[start : start + 8])
            loss = model(input_ids=ids[start : start + 8], labels=y[start : start + 8]).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        trace.end_epoch()
    t = load_trace(store)
    return t, identity_graph(model, t.layers, lambda: model(input_ids=ids[:8]))


def test_bert_graph_is_the_forward_pass(bert):
    t, expected = bert
    assert {k: t.layer_info(k)["inputs_from"] for k in t.layers} == expected
    # no elementwise functional op sits between BERT's recorded modules: every edge is the tensor itself
    assert all(ops == [] for k in t.layers for ops in t.layer_info(k)["input_ops"])
    elementwise = [k for k in t.layers if t.layer_info(k)["elementwise"]]
    assert {t.layer_info(k)["type"] for k in elementwise} == {"Dropout", "GELUActivation", "Tanh"}
    # the attention projections all read the embeddings' dropout, none reads another
    for name in ("query", "key", "value"):
        assert t.layer_info(f"{BERT_SELF}.{name}")["inputs_from"] == ["L_bert.embeddings.dropout"]


def test_bert_pathways_do_not_chain_query_key_value(bert, caplog):
    t, _ = bert
    for name in ("query", "key", "value"):  # 16 wide each: widths alone chained them before
        with caplog.at_level(logging.INFO, logger="nn_staining.staining"):
            caplog.clear()
            assert st.linear_chain(t, f"{BERT_SELF}.{name}") == [f"{BERT_SELF}.{name}"]
        assert caplog.messages == [
            f"pathways into {BERT_SELF}.{name}: the chain starts at {BERT_SELF}.{name}: its input comes "
            "from L_bert.embeddings.LayerNorm (LayerNorm), not from an nn.Linear through elementwise activations"
        ]
    # the classifier reads dropout(tanh(pooler.dense)): a real Linear -> activation -> Linear chain
    assert st.linear_chain(t) == ["L_bert.pooler.dense", "L_classifier"]
    assert st.linear_chain(t, "L_bert.encoder.layer.0.output.dense") == [
        "L_bert.encoder.layer.0.intermediate.dense",
        "L_bert.encoder.layer.0.output.dense",
    ]
    paths = st.pathways(t, 1, top_k=3)
    assert [len(p) for p in paths["path"]] == [3, 3, 3]
    assert all(p[1].startswith("L_bert.pooler.dense/") and p[2] == "L_classifier/n_1" for p in paths["path"])


def without_graph(trace, destination: Path):
    """A copy of the trace whose meta.json has no layer graph, as recorded before it existed."""
    shutil.copytree(trace.path, destination)
    meta = json.loads((destination / "meta.json").read_text())
    for info in meta["layers"]:
        for field in ("inputs_from", "input_ops", "elementwise"):
            info.pop(field)
    (destination / "meta.json").write_text(json.dumps(meta))
    return load_trace(destination)


def test_a_trace_without_the_graph_keeps_the_old_rules(bert, tmp_path):
    t, _ = bert
    old = without_graph(t, tmp_path / "old")
    assert not st.has_layer_graph(old) and st.has_layer_graph(t)
    assert st.linear_chain(old, f"{BERT_SELF}.value") == [
        f"{BERT_SELF}.{n}" for n in ("query", "key", "value")
    ]
    pd_old, pd_new = st.unit_health(old).neurons, st.unit_health(t).neurons
    assert pd_old.index.equals(pd_new.index)
    assert not pd_new["dead"].any()  # BERT has no ReLU: nothing is judged dead


def test_tampered_graph_in_meta_is_refused(bert, tmp_path):
    t, _ = bert
    shutil.copytree(t.path, tmp_path / "bad")
    meta = json.loads((tmp_path / "bad" / "meta.json").read_text())
    meta["layers"][5]["inputs_from"] = ["L_nowhere"]
    (tmp_path / "bad" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        TraceCorruptError, match=r"layers\[5\]\.inputs_from \['L_nowhere'\] is not a list of the trace's"
    ):
        load_trace(tmp_path / "bad")


# -- (b) the layer graph: dead units ---------------------------------------------------------------------
class CallOrder(nn.Module):
    """Registered drop, relu first; called: fc0 -> Dropout module -> ReLU, fc1 -> drop (signed, then a
    Linear), fc2 -> relu, fc3 -> functional dropout -> torch.relu, out. Neuron 0 of every Linear is -1."""

    def __init__(self) -> None:
        super().__init__()
        self.drop, self.relu = nn.Dropout(0.25), nn.ReLU()
        self.fc0, self.drop0, self.relu0 = nn.Linear(4, 4), nn.Dropout(0.25), nn.ReLU()
        self.fc1, self.fc2, self.fc3, self.out = (
            nn.Linear(4, 4),
            nn.Linear(4, 4),
            nn.Linear(4, 4),
            nn.Linear(4, 3),
        )
        with torch.no_grad():
            for linear in (self.fc0, self.fc1, self.fc2, self.fc3, self.out):
                linear.weight[0] = 0.0
                linear.bias[0] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu0(self.drop0(self.fc0(x)))
        h = self.fc2(self.drop(self.fc1(h)))
        h = self.fc3(self.relu(h))
        return self.out(torch.relu(nn.functional.dropout(h, 0.25, self.training)))


#: Per layer of CallOrder: is "never positive" a dead unit? (written out by hand from forward())
CALL_ORDER_JUDGED = {
    "L_drop": False,  # signed, feeds fc2 (the next module registered is a ReLU, which never sees it)
    "L_relu": True,
    "L_fc0": True,  # through the Dropout module into relu0
    "L_drop0": True,
    "L_relu0": True,
    "L_fc1": False,  # into drop, then fc2
    "L_fc2": True,
    "L_fc3": True,  # through functional dropout (mul) into torch.relu
    "L_out": False,  # the logits
}


def of_layer(frame, layer: str) -> np.ndarray:
    """The ``dead`` column of one layer's rows (the index keeps model order, not sorted)."""
    return frame["dead"].to_numpy()[frame.index.get_level_values("layer") == layer]


def captured_outputs(model: nn.Module, layers: list[str]) -> tuple[dict[str, list[np.ndarray]], list]:
    named = dict(model.named_modules())
    seen: dict[str, list[np.ndarray]] = {key: [] for key in layers}
    handles = [
        named[key[2:]].register_forward_hook(
            lambda m, a, o, key=key: seen[key].append(
                (o if isinstance(o, torch.Tensor) else o[0]).detach().double().numpy().copy()
            )
        )
        for key in layers
    ]
    return seen, handles


def test_dead_is_judged_in_call_order_not_registration_order(tmp_path):
    torch.manual_seed(3)
    model = CallOrder()
    x, y = class_data(60, 4, seed=4)
    seen, handles = captured_outputs(model, list(CALL_ORDER_JUDGED))
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        for start in range(0, 60, 20):
            trace.set_targets(y[start : start + 20])
            model(x[start : start + 20])
        trace.end_epoch()
    for handle in handles:
        handle.remove()
    t = load_trace(tmp_path / "t")
    assert t.layers == list(CALL_ORDER_JUDGED)
    assert t.layer_info("L_out")["input_ops"] == [["mul", "relu"]]
    health = st.unit_health(t).neurons
    stains = st.selectivity(t, epoch=0)
    for layer, judged in CALL_ORDER_JUDGED.items():
        rows = np.concatenate(seen[layer])
        never = (rows.max(0) <= 0) | ((rows > 0).mean(0) == 0)
        assert never[0], layer  # neuron 0 is never positive everywhere: only the judgement differs
        np.testing.assert_array_equal(of_layer(health, layer), judged & never, err_msg=layer)
        np.testing.assert_array_equal(of_layer(stains, layer), judged & never, err_msg=layer)
    old = st.unit_health(without_graph(t, tmp_path / "old")).neurons  # the old rule: registration order
    assert old.loc[(0, "L_drop", 0), "dead"] and old.loc[(0, "L_fc1", 0), "dead"]


class SignedLSTM(nn.Module):
    """An LSTM whose unit 0 is pushed negative (cell input -1, input and output gates open), then a head
    on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(3, 6, batch_first=True), nn.Linear(6, CLASSES)
        with torch.no_grad():  # gate order i, f, g, o: rows 0, 6, 12, 18 are unit 0's
            for gate, bias in ((0, 8.0), (6, -8.0), (12, -8.0), (18, 8.0)):
                self.lstm.weight_ih_l0[gate] = 0.0
                self.lstm.weight_hh_l0[gate] = 0.0
                self.lstm.bias_ih_l0[gate] = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def test_lstm_signed_outputs_are_never_dead(tmp_path):
    torch.manual_seed(5)
    model = SignedLSTM()
    x = torch.randn(40, 7, 3, generator=torch.Generator().manual_seed(6))
    y = torch.arange(40) % CLASSES
    seen, handles = captured_outputs(model, ["L_lstm"])
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        for start in range(0, 40, 10):
            trace.set_targets(y[start : start + 10])
            loss = nn.functional.cross_entropy(model(x[start : start + 10]), y[start : start + 10])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        trace.end_epoch()
    for handle in handles:
        handle.remove()
    t = load_trace(tmp_path / "t")
    rows = np.concatenate([b.reshape(-1, 6) for b in seen["L_lstm"]])
    assert rows[:, 0].max() < 0 and (rows[:, 1:] > 0).any(0).all()  # unit 0 never positive, the rest signed
    assert_close(t.query("E_0/L_lstm")["act_max"], rows.max(0))
    assert t.layer_info("L_head")["inputs_from"] == []  # it reads the last step: a select, no edge
    health = st.unit_health(t).neurons
    assert not health["dead"].any()
    assert not st.selectivity(t, epoch=0)["dead"].any()
    old = st.unit_health(without_graph(t, tmp_path / "old")).neurons
    assert of_layer(old, "L_lstm").tolist() == [True] + [False] * 5  # what the old rule said


# -- (c) a module called twice in one pass ----------------------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one in-place ReLU called before and after the residual sum."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layer1(self.stem(x))).flatten(1))


def test_a_relu_called_twice_is_recorded_per_call(tmp_path):
    torch.manual_seed(7)
    model = TinyResNet()
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(36, 1, 6, 6, generator=g), torch.arange(36) % CLASSES
    calls: list[list[np.ndarray]] = []  # per pass, each call's per-sample channel means
    model.layer1[0].relu.register_forward_hook(
        lambda m, a, o: calls[-1].append(o.detach().double().mean((2, 3)).numpy())
    )
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        for epoch in range(2):
            trace.start_epoch(epoch)
            per_call: list[list[np.ndarray]] = [[], []]
            for start in range(0, 36, 12):
                calls.append([])
                trace.set_targets(y[start : start + 12])
                loss = nn.functional.cross_entropy(model(x[start : start + 12]), y[start : start + 12])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                assert len(calls[-1]) == 2
                per_call[0].append(calls[-1][0])
                per_call[1].append(calls[-1][1])
            trace.end_epoch()
            t = trace.load()
            for key, batches in zip(("L_layer1.0.relu", "L_layer1.0.relu:2"), per_call):
                rows = np.concatenate(batches)
                frame = t.query(f"E_{epoch}/{key}")
                for column, expected in numpy_stats(rows).items():
                    assert_close(frame[column], expected, err_msg=f"{key} {column}")
                counts, means = class_means(rows, y.numpy(), CLASSES)
                classes = t.classes(f"E_{epoch}/{key}")["act_mean"].unstack("class").to_numpy()
                assert_close(classes, means, err_msg=key)
            # the two calls differ sample by sample: one merged layer described neither
            assert np.abs(np.concatenate(per_call[0]) - np.concatenate(per_call[1])).max() > 0.1
    assert t.layers == [
        "L_stem",
        "L_layer1.0.conv1",
        "L_layer1.0.bn1",
        "L_layer1.0.relu",
        "L_layer1.0.relu:2",
        "L_layer1.0.conv2",
        "L_layer1.0.bn2",
        "L_pool",
        "L_fc",
    ]
    second = t.layer_info("L_layer1.0.relu:2")
    assert (second["module"], second["call"], second["first_call"]) == ("layer1.0.relu", 2, "L_layer1.0.relu")
    assert t.layer_info("L_layer1.0.relu")["inputs_from"] == ["L_layer1.0.bn1"]
    assert t.layer_info("L_layer1.0.conv2")["inputs_from"] == ["L_layer1.0.relu"]  # in place: the first call
    assert second["inputs_from"] == []  # it reads bn2's output plus the block's input: no single layer
    assert t["E_1/L_layer1.0.relu:2/n_2"]["act_count"] == 36
    assert t.query("E_1/L_layer1.0.relu:*").index.get_level_values("layer").unique().tolist() == [
        "L_layer1.0.relu:2"
    ]


class Repeat(nn.Module):
    """A Linear applied ``times`` times in a row (a weight-tied recurrence), the count set per pass."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(4, 4)
        self.times = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.times):
            x = torch.tanh(self.cell(x))
        return x


def test_calls_made_in_some_passes_only_count_those_passes(tmp_path):
    torch.manual_seed(9)
    model = Repeat()
    x, y = class_data(30, 4, seed=10)
    seen: list[list[np.ndarray]] = []
    model.cell.register_forward_hook(lambda m, a, o: seen[-1].append(o.detach().double().numpy()))
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        for start, times in ((0, 2), (10, 3), (20, 1)):
            model.times = times
            seen.append([])
            trace.set_targets(y[start : start + 10])
            model(x[start : start + 10])
        trace.end_epoch()
    t = load_trace(tmp_path / "t")
    assert t.layers == ["L_cell", "L_cell:2", "L_cell:3"]
    for call, key in enumerate(t.layers):
        rows = np.concatenate([p[call] for p in seen if len(p) > call])
        frame = t.query(f"E_0/{key}")
        for column, expected in numpy_stats(rows).items():
            assert_close(frame[column], expected, err_msg=f"{key} {column}")
    assert t.query("E_0/L_cell:3")["act_count"].tolist() == [10] * 4  # only the pass with a third call
    # weights belong to the module: stored once, under its first call, and used for every call's pathways
    assert t.layer_info("L_cell:2")["has_weights"] is False
    np.testing.assert_array_equal(t.weights(0, "L_cell"), model.cell.weight.detach().numpy())
    assert st.linear_chain(t, "L_cell:3") == ["L_cell", "L_cell:2", "L_cell:3"]  # through torch.tanh
    inputs = np.concatenate([p[1] for p in seen if len(p) > 2])  # call 3 reads tanh(call 2)
    labels = np.concatenate(
        [y[start : start + 10].numpy() for start, p in zip((0, 10, 20), seen) if len(p) > 2]
    )
    expected = (
        model.cell.weight.detach().double().numpy()[None]
        * np.stack([np.tanh(inputs[labels == c]).mean(0) for c in range(CLASSES)])[:, None, :]
    )
    assert_close(st.contributions(t, "L_cell:3", 0), expected)


def test_a_module_named_like_a_call_is_refused(tmp_path):
    model = nn.Sequential()
    model.add_module("act", nn.ReLU())
    model.add_module("act:2", nn.ReLU())
    with pytest.raises(ValueError) as info:
        NetworkTrace(model, tmp_path / "t")
    assert str(info.value) == (
        "module 'act:2' has the layer key 'L_act:2', which is the key of call 2 of module 'act'; "
        "rename one or leave one out with layers="
    )
    NetworkTrace(model, tmp_path / "t2", layers=["act:2"]).close()  # alone it is a module like any other


def test_graph_without_autograd_uses_identity_and_version_counters(tmp_path):
    """Under no_grad the edges come from tensor identity: the in-place ReLU's first call reads bn1's
    output; its second call reads bn2's output changed in place by the residual sum: no edge."""
    torch.manual_seed(11)
    model = TinyResNet()
    x, y = torch.randn(12, 1, 6, 6), torch.arange(12) % CLASSES
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace, torch.no_grad():
        trace.start_epoch(0)
        for _ in range(3):
            trace.set_targets(y)
            model(x)
        trace.end_epoch()
    t = load_trace(tmp_path / "t")
    graph = {k: t.layer_info(k)["inputs_from"] for k in t.layers}
    assert graph == {
        "L_stem": [],
        "L_layer1.0.conv1": ["L_stem"],
        "L_layer1.0.bn1": ["L_layer1.0.conv1"],
        "L_layer1.0.relu": ["L_layer1.0.bn1"],
        "L_layer1.0.relu:2": [],
        "L_layer1.0.conv2": ["L_layer1.0.relu"],
        "L_layer1.0.bn2": ["L_layer1.0.conv2"],
        "L_pool": ["L_layer1.0.relu:2"],
        "L_fc": [],  # it reads pool(...).flatten(1): a reshape, no edge
    }
    elementwise = [k for k in t.layers if t.layer_info(k)["elementwise"]]
    assert elementwise == ["L_layer1.0.relu", "L_layer1.0.relu:2"]


class LateBranch(nn.Module):
    """``extra`` runs only once ``late`` is set, after the graph's first passes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.extra, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, CLASSES)
        self.late = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        if self.late:
            h = torch.tanh(self.extra(h))
        return self.out(h)


def test_a_layer_that_first_runs_later_is_learnt_in_the_next_pass(tmp_path):
    torch.manual_seed(12)
    model = LateBranch()
    x, y = class_data(20, 4, seed=13)
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        for epoch in range(2):
            trace.start_epoch(epoch)
            for _ in range(4):
                trace.set_targets(y)
                model(x)
            model.late = True  # its first pass learns nothing of it (no graph pass left); the next one does
            trace.end_epoch()
    t = load_trace(tmp_path / "t")
    assert t.layers == ["L_fc", "L_extra", "L_out"]
    assert t.layer_info("L_extra")["inputs_from"] == ["L_fc"]
    assert t.layer_info("L_extra")["input_ops"] == [["relu"]]
    # out read relu(fc) in the first passes and tanh(extra) later: the graph is the union of what it saw
    assert t.layer_info("L_out")["inputs_from"] == ["L_fc", "L_extra"]
    assert t.layer_info("L_out")["input_ops"] == [["relu"], ["tanh"]]
    assert st.linear_chain(t, "L_extra") == ["L_fc", "L_extra"]
