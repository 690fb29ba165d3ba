"""passes.tensors: the one byte size of a TensorProto and of a gs.Constant."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes.convert import ExternalDataError, external_nbytes
from passes.gs_adapter import LazyValues, lazy_values
from passes.tensors import const_nbytes, tensor_nbytes


def header(data_type, dims):
    t = TensorProto(name="t", data_type=data_type)
    t.dims.extend(dims)
    return t


@pytest.mark.parametrize("data_type", [TensorProto.FLOAT, TensorProto.INT64, TensorProto.FLOAT16, TensorProto.BOOL,
                                       TensorProto.BFLOAT16, TensorProto.COMPLEX128, TensorProto.FLOAT8E4M3FN])
def test_fixed_size_types_match_their_serialized_raw_data(data_type):
    np_type = helper.tensor_dtype_to_np_dtype(data_type)
    t = numpy_helper.from_array(np.zeros((3, 5), np_type), "t")
    assert t.data_type == data_type and tensor_nbytes(t) == len(t.raw_data) == 15 * np.dtype(np_type).itemsize


def test_scalars_empty_and_packed_types():
    assert tensor_nbytes(header(TensorProto.FLOAT, [])) == 4  # a scalar: one element
    assert tensor_nbytes(header(TensorProto.FLOAT, [0, 7])) == 0
    assert tensor_nbytes(header(TensorProto.INT4, [5])) == 3  # two to a byte
    assert tensor_nbytes(header(TensorProto.UINT2, [5])) == 2  # four to a byte


def test_no_fixed_size_is_none():
    assert tensor_nbytes(helper.make_tensor("s", TensorProto.STRING, [2], [b"a", b"b"])) is None
    assert tensor_nbytes(header(TensorProto.UNDEFINED, [3])) is None


def test_external_tensors_count_dims_or_the_recorded_length():
    t = header(TensorProto.FLOAT, [4, 4])
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.data"), ("length", "100")):
        e = t.external_data.add()
        e.key, e.value = key, value
    assert tensor_nbytes(t) == external_nbytes(t) == 64
    assert tensor_nbytes(t, external_length=True) == 100
    del t.external_data[1:]  # no length recorded: from the dims
    assert tensor_nbytes(t, external_length=True) == 64


def test_types_that_cannot_be_external():
    with pytest.raises(ExternalDataError, match="string data cannot be stored externally"):
        external_nbytes(header(TensorProto.STRING, [3]))
    with pytest.raises(ExternalDataError, match="data type 0 cannot be stored externally"):
        external_nbytes(header(TensorProto.UNDEFINED, [3]))


def test_const_nbytes_does_not_load_lazy_values():
    t = numpy_helper.from_array(np.ones((8, 16), np.float32), "w")
    lazy = gs.Constant("w", LazyValues(t))
    assert const_nbytes(lazy) == 512 and isinstance(lazy_values(lazy), LazyValues)
    assert const_nbytes(gs.Constant("c", np.zeros(3, np.int64))) == 24
