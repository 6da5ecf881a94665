import pytest
import torch

import learnedopt
from learnedopt import CoordinatewiseLSTM, load_net, save_net


def test_packaged_nets_load_without_network():
    names = learnedopt.list_pretrained()
    assert "quadratic-lstm" in names and learnedopt.DEFAULT_NET in names
    net = load_net("quadratic-lstm")
    assert isinstance(net, CoordinatewiseLSTM) and net.config.hidden_size == 20


def test_round_trip_by_file_and_by_run_folder(tmp_path):
    net = CoordinatewiseLSTM(hidden_size=7, output_scale=0.05)
    save_net(net, tmp_path / "net.pt", task="test")
    for source in (tmp_path / "net.pt", str(tmp_path)):
        loaded = load_net(source)
        assert loaded.config == net.config
        for a, b in zip(net.state_dict().values(), loaded.state_dict().values()):
            assert torch.equal(a, b)
    assert learnedopt.net_info(tmp_path / "net.pt")["task"] == "test"


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Packaged nets: .*quadratic-lstm"):
        load_net("mnist-lstmm")


def test_corrupt_file(tmp_path):
    path = tmp_path / "net.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable learnedopt net file"):
        load_net(path)


def test_file_with_code_is_not_unpickled(tmp_path):
    path = tmp_path / "net.pt"
    torch.save(CoordinatewiseLSTM(), path)  # a pickled module, not a weights file
    with pytest.raises(ValueError, match="not a readable learnedopt net file"):
        load_net(path)


def test_foreign_weights_file(tmp_path):
    path = tmp_path / "net.pt"
    torch.save({"weight": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="not a learnedopt net file"):
        load_net(path)


def test_architecture_mismatch(tmp_path):
    path = save_net(CoordinatewiseLSTM(hidden_size=8), tmp_path / "net.pt")
    blob = torch.load(path, weights_only=True)
    blob["config"]["hidden_size"] = 20
    torch.save(blob, path)
    with pytest.raises(ValueError, match="is corrupt"):  # the stored digest no longer matches
        load_net(path)
    del blob["sha256"]  # a file written without a digest (older versions, other tools)
    torch.save(blob, path)
    with pytest.raises(ValueError, match="do not match the architecture its header describes"):
        load_net(path)
