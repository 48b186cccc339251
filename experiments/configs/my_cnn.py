"""An example models config (configs as code): your own flax model, run through the paper's experiments.

    python -m experiments.table1 --models experiments/configs/my_cnn.py
    python -m experiments.table2 --models experiments/configs/my_cnn.py
    python -m experiments.table5 --models experiments/configs/my_cnn.py --no-alexnet
    python -m experiments.units  --models experiments/configs/my_cnn.py

An experiment imports this file and calls `get_models(context)`, which returns
{name: (model, params)}: a flax module and its variables (or a function
apply(params, x) and its parameters), loaded however you load them. Here the
CNN is trained once on the training split (2,000 images with --quick), saved
as a checkpoint under WORKDIR/models/<name>/ and loaded by every later run.
"""
import flax.linen as nn
import jax
import optax

from jaxadv.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from jaxadv.data import load_dataset
from jaxadv.train import fit


class CNN(nn.Module):
    """A strided convolution, average pooling and a dense head."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (5, 5), strides=2)(x))      # 28 -> 14
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))          # 14 -> 7
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def train_cnn(images, labels, epochs: int, seed: int = 0, verbose: bool = True) -> dict:
    """CNN's variables, trained with Adam on cross-entropy (`jaxadv.train.fit`: one lax.scan per epoch)."""
    model = CNN()
    variables = model.init(jax.random.PRNGKey(seed), images[:1])

    def loss(variables, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(variables, x), y).mean()

    return fit(loss, variables, (images, labels), jax.random.PRNGKey(seed + 1), optax.adam(2e-3), epochs,
               batch_size=128, name="CNN", verbose=verbose)


def get_models(context) -> dict:
    name = "CNN-quick" if context.quick else "CNN"
    directory = f"{context.workdir}/models/{name}"
    if has_checkpoint(directory):
        like = jax.eval_shape(CNN().init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 28, 28, 1), "float32"))
        variables, _ = load_checkpoint(directory, like)
    else:
        train = load_dataset(context.dataset, "train", context.data_dir)
        count = 2000 if context.quick else len(train.labels)
        variables = train_cnn(train.images[:count], train.labels[:count], epochs=1 if context.quick else 5)
        save_checkpoint(directory, variables, {"model": name, "dataset": context.dataset, "num_train": count})
    return {name: (CNN(), variables)}
