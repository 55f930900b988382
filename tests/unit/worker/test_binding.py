import pytest

from worker.binding import Binding, bind_node


@pytest.mark.parametrize("cpus, node_cpus, engines, spare", [
    ([1], 2, [(0,)], (1,)),
    ([1, 1], 2, [(0,), (1,)], ()),
    ([1, 1], 4, [(0,), (1,)], (2, 3)),
    ([1, 1, 1, 1], 2, [(0,), (1,), (0,), (1,)], ()),  # more engines than cores: they wrap around the node
    ([2], 3, [(0, 1)], (2,)),
    ([1, 2], 4, [(0,), (1, 2)], (3,)),
])
def test_engines_get_their_own_cores_and_actors_get_the_rest(cpus, node_cpus, engines, spare):
    assert bind_node(cpus, node_cpus) == [Binding(cores, spare) for cores in engines]


def test_the_omp_binding_lists_the_engine_cores():
    assert bind_node([2], 4)[0].omp_bind() == "0,1"


def test_a_node_without_cores_is_refused():
    with pytest.raises(ValueError, match="a node needs >= 1 core"):
        bind_node([1], 0)
