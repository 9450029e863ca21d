import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tests train tiny nets: a second intra-op thread only adds synchronisation,
    and on a busy machine it stalls them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
