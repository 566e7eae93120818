"""Train a language-model head sharded over a 2x4 device mesh (data x model) with jaxce.

The output layer ``w [D, V]`` is split over the ``model`` axis (each device holds V/4 columns)
and the batch over the ``data`` axis (each device holds N/2 tokens). Inside ``shard_map`` the
jaxce loss gets ``class_axis_name="model"`` and ``batch_axis_name="data"``: it combines O(N)
statistics across devices (pmax / psum), never gathers the [N, V] logits, and returns the
global mean; ``jax.grad`` outside ``shard_map`` gives the gradients of the sharded parameters.

Run:  python examples/sharded_lm_head.py

Without 8 accelerators it simulates 8 CPU devices (XLA_FLAGS, set before JAX starts).
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxce  # noqa: E402

DATA, MODEL = "data", "model"
N, D, V = 256, 64, 4096  # tokens per step, hidden size, vocabulary
STEPS = 10


def devices_2x4():
    """8 real accelerators when present, else the 8 simulated CPU devices."""
    devices = jax.devices()
    if devices[0].platform == "cpu" or len(devices) < 8:
        devices = jax.devices("cpu")
    if len(devices) < 8:
        raise SystemExit(f"needs 8 devices, found {len(devices)}: set XLA_FLAGS before JAX starts")
    return np.array(devices[:8]).reshape(2, 4)


def local_loss(params, tokens, targets):
    """One device's shard: tokens [N/2], w [D, V/4]; returns the global mean loss."""
    h = jnp.tanh(params["embed"][tokens])  # [N/2, D], the "model" (replicated, small)
    return jaxce.linear_softmax_cross_entropy(  # the fused x @ w loss, w: this device's V/4 slice
        h, params["w"], targets, reduction="mean", class_axis_name=MODEL, batch_axis_name=DATA)


def main():
    mesh = Mesh(devices_2x4(), (DATA, MODEL))
    specs = {"embed": P(), "w": P(None, MODEL)}
    loss = jax.shard_map(
        local_loss,
        mesh=mesh,
        in_specs=(specs, P(DATA), P(DATA)),
        out_specs=P(),
    )
    optimizer = optax.adam(3e-2)

    @jax.jit
    def step(params, opt_state, tokens, targets):
        value, grads = jax.value_and_grad(loss)(params, tokens, targets)  # grad outside shard_map
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    key_embed, key_w, key_data = jax.random.split(jax.random.key(0), 3)
    params = {
        "embed": jax.random.normal(key_embed, (V, D)) * 0.5,
        "w": jax.random.normal(key_w, (D, V)) / np.sqrt(D),
    }
    params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    opt_state = optimizer.init(params)
    batch = NamedSharding(mesh, P(DATA))

    def data(key):  # a toy "language": the next token is 7 * token + 3 mod V
        tokens = jax.random.randint(key, (N,), 0, V)
        return jax.device_put(tokens, batch), jax.device_put((7 * tokens + 3) % V, batch)

    print(f"mesh {dict(mesh.shape)} on {mesh.devices.size} {mesh.devices.flat[0].platform} devices; "
          f"N={N} tokens, D={D}, V={V}; w {params['w'].shape} holds "
          f"{params['w'].addressable_shards[0].data.shape} per device")
    print("loss: jaxce.linear_softmax_cross_entropy (fused)")
    memory = step.lower(params, opt_state, *data(key_data)).compile().memory_analysis()
    if memory is not None:
        embed_kib, w_kib = V * D * 4 / 2**10, D * (V // 4) * 4 / 2**10  # float32
        print(f"per-device memory of the train step: temp {memory.temp_size_in_bytes / 2**10:.0f} KiB "
              f"(the [N, V] logits would be {N * V * 4 / 2**10:.0f} KiB, "
              f"one device's [N/2, V/4] slice {N * V // 8 * 4 / 2**10:.0f} KiB)")
        print(f"  arguments {memory.argument_size_in_bytes / 2**10:.0f} KiB and outputs "
              f"{memory.output_size_in_bytes / 2**10:.0f} KiB, no logits: the parameters and "
              f"Adam's two moments, 3 x (replicated embed [V, D] {embed_kib:.0f} KiB + this "
              f"device's w slice [D, V/4] {w_kib:.0f} KiB), plus the tokens")
    for i in range(STEPS):
        tokens, targets = data(jax.random.fold_in(key_data, i))
        params, opt_state, value = step(params, opt_state, tokens, targets)
        print(f"step {i}: loss {float(value):.4f}")
    assert float(value) < np.log(V), "the loss should fall below log(V) = uniform guessing"


if __name__ == "__main__":
    main()
