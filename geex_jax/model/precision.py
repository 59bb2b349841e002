"""Mixed-precision products: fp32 out, operand-dtype backward.

`einsum_f32` is an einsum that accumulates and returns fp32 (the logits, the attention scores)
whose backward runs in the operands' dtype. JAX's own transpose of
`einsum(..., preferred_element_type=float32)` multiplies the fp32 cotangent with the bf16
operand, which XLA lowers as an fp32 x fp32 product: with bf16 compute, the two
[tokens x vocab x hidden] products of the output embedding and four per layer in attention ran
in fp32. Here the cotangent is cast to the operands' dtype first (as MaxText and FlashAttention
do), so each backward product is a bf16 x bf16 product like the rest of the step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def einsum_f32(equation: str, x: Array, y: Array) -> Array:
  """jnp.einsum(equation, x, y) accumulated and returned in fp32; gradients in x's / y's dtype."""
  if x.dtype == jnp.float32 and y.dtype == jnp.float32:
    return jnp.einsum(equation, x, y, preferred_element_type=jnp.float32)
  return _einsum_f32(equation, x, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_f32(equation: str, x: Array, y: Array) -> Array:
  return jnp.einsum(equation, x, y, preferred_element_type=jnp.float32)


def _forward(equation: str, x: Array, y: Array):
  return _einsum_f32(equation, x, y), (x, y)


def _backward(equation: str, residuals, g: Array):
  x, y = residuals
  dtype = jnp.result_type(x.dtype, y.dtype)
  # The transpose of a product in `dtype`: both backward products take `dtype` operands.
  _, vjp = jax.vjp(
    lambda a, b: jnp.einsum(equation, a, b, preferred_element_type=dtype), x.astype(dtype), y
  )
  dx, dy = vjp(g.astype(dtype))
  return dx.astype(x.dtype), dy.astype(y.dtype)


_einsum_f32.defvjp(_forward, _backward)
