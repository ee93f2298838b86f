"""The pictures of vae/pictures/__init__.py, tile by tile, against pictures worked out by hand.

The model has N = 2 variables of K = 3 classes and 2 x 3 images (so the image shape must come from the model:
28 x 28 would not even reshape). Its decoder draws the code itself: pixel (n, k) is white exactly when z_n = k,
so a decoded picture *is* the one-hot code, row n = variable n. Its encoder is one Linear layer with hand-set
weights and the images light one pixel each, so image i's posterior logits are exactly the weight column i.
"""
import pytest
import torch
import torch.nn as nn

from vae import pictures
from vae.core.model import CategoricalVAE

N, K = 2, 3
H, W = 2, 3                # one pixel per code unit
SURE = 100.0               # a logit margin that makes sigmoid 0 or 1 to float32 precision
LOGITS = torch.tensor([    # q(z|x_i) logits [N, K] of image i
    [[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]],   # image 0: code (0, 2), but q(z_0 = 0|x) is only 0.67
    [[0.0, 3.0, 0.0], [5.0, 0.0, 0.0]],   # image 1: code (1, 0)
    [[0.0, 0.0, 1.0], [0.0, 4.0, 0.0]],   # image 2: code (2, 1)
])


def code_image(*classes: int) -> torch.Tensor:
    """The picture [H, W] the decoder draws for the one-hot code z_n = classes[n]."""
    image = torch.zeros(H, W)
    image[torch.arange(N), torch.tensor(classes)] = 1.0
    return image


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = CategoricalVAE(N, K)
    model.encoder = nn.Linear(H * W, N * K)
    model.decoder = nn.Linear(N * K, H * W)
    with torch.no_grad():
        model.encoder.weight.zero_()
        model.encoder.bias.zero_()
        for i in range(len(LOGITS)):
            model.encoder.weight[:, i] = LOGITS[i].flatten()
        model.decoder.weight.copy_(2 * SURE * torch.eye(N * K))  # logit SURE where z = 1, -SURE where z = 0
        model.decoder.bias.fill_(-SURE)
    model.image_shape = (H, W)
    return model


def images(*which: int) -> torch.Tensor:
    """Flat images [len(which), H * W]: image i lights pixel i."""
    x = torch.zeros(len(which), H * W)
    x[torch.arange(len(which)), torch.tensor(which)] = 1.0
    return x


def tile(grid: torch.Tensor, row: int, col: int, shape=(H, W)) -> torch.Tensor:
    """The picture at (row, col) of a grid with 2 px of padding (channel 0 of 3 equal ones)."""
    h, w = shape
    top, left = 2 + (h + 2) * row, 2 + (w + 2) * col
    return grid[0, top:top + h, left:left + w]


def grid_size(rows: int, cols: int, shape=(H, W)) -> tuple:
    return (3, 2 + (shape[0] + 2) * rows, 2 + (shape[1] + 2) * cols)


def test_the_image_shape_comes_from_the_model_else_28_by_28(model):
    assert pictures.image_shape_of(model) == (H, W)
    assert pictures.image_shape_of(CategoricalVAE(N, K)) == (28, 28)  # a model that does not say
    assert pictures.image_shape_of(model, (4, 5)) == (4, 5)          # an explicit shape wins


def test_reconstruction_is_the_argmax_code_decoded_every_time(model):
    x = images(0, 1, 2)
    grid = pictures.reconstruction_grid(model, x)
    assert grid.shape == grid_size(2, 3)
    torch.testing.assert_close(grid[1], grid[0])
    for i, code in enumerate([(0, 2), (1, 0), (2, 1)]):
        torch.testing.assert_close(tile(grid, 0, i), x[i].view(H, W))          # top row: the images
        torch.testing.assert_close(tile(grid, 1, i), code_image(*code))        # below: their argmax codes
    # Image 0's variable 0 is unsure (q = 0.67): a sampled code would differ now and then, the argmax never.
    torch.testing.assert_close(pictures.reconstruction_grid(model, x), grid)


def test_prior_samples_are_the_argmax_of_log_prior_plus_noise(model):
    noise = torch.zeros(4, N, K)
    for s, code in enumerate([(0, 0), (1, 2), (2, 1), (2, 2)]):
        noise[s, torch.arange(N), torch.tensor(code)] = 1.0  # the uniform prior: the noise alone decides
    grid = pictures.prior_grid(model, noise, nrow=2)
    assert grid.shape == grid_size(2, 2)
    for s, code in enumerate([(0, 0), (1, 2), (2, 1), (2, 2)]):
        torch.testing.assert_close(tile(grid, s // 2, s % 2), code_image(*code))


def test_traversal_rows_are_top_kl_variables_and_columns_are_classes(model):
    x = images(2)[0]                                 # code (2, 1)
    grid = pictures.traversal_grid(model, x, torch.tensor([0.5, 2.0]))
    assert grid.shape == grid_size(N, K)
    for k in range(K):
        torch.testing.assert_close(tile(grid, 0, k), code_image(2, k))  # row 0: variable 1 (higher KL) set to k
        torch.testing.assert_close(tile(grid, 1, k), code_image(k, 1))  # row 1: variable 0


def test_traversal_keeps_at_most_max_rows_in_a_stable_order(model):
    x = images(1)[0]                                 # code (1, 0)
    collapsed = torch.zeros(N)                       # equal KLs: the variables' own order
    grid = pictures.traversal_grid(model, x, collapsed, max_rows=1)
    assert grid.shape == grid_size(1, K)
    for k in range(K):
        torch.testing.assert_close(tile(grid, 0, k), code_image(k, 0))
    assert pictures.traversal_grid(model, x, collapsed, max_rows=10).shape == grid_size(N, K)


def test_usage_map_tiles_are_k_q_over_2_and_line_up_with_the_classes():
    usage = torch.tensor([[1 / 6, 2 / 6, 3 / 6],   # 1/K = 1/3 is mid grey: levels 0.25, 0.5, 0.75
                          [1.0, 0.0, 0.0]],       # one class for every image: white, then never used: black
                         dtype=torch.float64)
    grid = pictures.usage_map(usage, image_shape=(H, W))
    assert grid.shape == grid_size(N, K)
    for (n, k), level in {(0, 0): 0.25, (0, 1): 0.5, (0, 2): 0.75, (1, 0): 1.0, (1, 1): 0.0, (1, 2): 0.0}.items():
        torch.testing.assert_close(tile(grid, n, k), torch.full((H, W), level), msg=f"variable {n}, class {k}")
    # The default tile is MNIST's 28 x 28, as the traversal's for the default model.
    assert pictures.usage_map(usage).shape == grid_size(N, K, (28, 28))


def test_class_means_rows_follow_kl_and_empty_classes_are_blank():
    means = torch.zeros(N, K, H * W)
    means[0, 0] = images(0)[0]
    means[0, 1] = images(1, 2).mean(0)               # two images had class 1: their mean, 0.5 on two pixels
    means[1, 2] = images(0, 1, 2).mean(0)            # every image: 1/3 on three pixels
    counts = torch.tensor([[1, 2, 0], [0, 0, 3]])
    grid = pictures.class_means_grid(means, counts, torch.tensor([1.0, 2.0]), image_shape=(H, W))
    assert grid.shape == grid_size(N, K)
    blank = torch.ones(H, W)
    want = {(0, 0): blank, (0, 1): blank, (0, 2): torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0, 0, 0]]),  # variable 1
            (1, 0): torch.tensor([[1.0, 0, 0], [0, 0, 0]]), (1, 1): torch.tensor([[0, 0.5, 0.5], [0, 0, 0]]),
            (1, 2): blank}                                                                          # variable 0
    for (r, k), picture in want.items():
        torch.testing.assert_close(tile(grid, r, k), picture, msg=f"row {r}, class {k}")
    one_row = pictures.class_means_grid(means, counts, torch.tensor([1.0, 2.0]), max_rows=1, image_shape=(H, W))
    torch.testing.assert_close(one_row, grid[:, :2 + H + 2])


def test_latent_pictures_draws_the_code_from_code_usage_stats(model):
    from types import SimpleNamespace

    from vae.pictures.latents import code_usage

    x = images(0, 1, 2)  # a split of 2 x 3 images, in the shape of vae.data.device_data.DeviceSplit
    split = SimpleNamespace(n=3, device=x.device, batches=lambda b, generator=None: iter(x.split(b)))
    stats = code_usage(model, split, batch_size=2)
    drawn = pictures.latent_pictures(model, images(0)[0], stats, max_rows=10)
    assert set(drawn) == {"traversal", "usage", "class_means"}
    assert all(p.shape == grid_size(N, K) for p in drawn.values())
    # Each image has its own class for each variable (codes (0, 2), (1, 0), (2, 1)): every class mean is one image.
    torch.testing.assert_close(stats["class_counts"], torch.ones(N, K, dtype=torch.long))
    order = pictures.top_kl_variables(stats["kl_per_variable"], 10).tolist()
    for r, n in enumerate(order):
        for i, code in enumerate([(0, 2), (1, 0), (2, 1)]):
            torch.testing.assert_close(tile(drawn["class_means"], r, code[n]), images(i)[0].view(H, W))


def test_save_png_writes_the_picture(model, tmp_path):
    from PIL import Image

    grid = pictures.reconstruction_grid(model, images(0, 1))
    pictures.save_png(grid, tmp_path / "r.png")
    with Image.open(tmp_path / "r.png") as im:
        assert im.size == (grid.shape[2], grid.shape[1]) and im.mode == "RGB"
        assert im.getpixel((0, 0)) == (255, 255, 255)                      # white padding
        assert im.getpixel((2, 2)) == (255, 255, 255)                      # image 0's lit pixel
        assert im.getpixel((3, 2)) == (0, 0, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]                # no temporary file left behind
