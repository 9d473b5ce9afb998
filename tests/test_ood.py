"""Out-of-distribution inputs and typicality: the variants, latent norms, scores and the AUC."""
import pytest
import torch

from conftest import perturb_
from flowbook.models import create_flow
from flowbook.ood import bpd_terms, latent_norms, ood_variants, separation_auc, typicality_score


def test_variants_are_valid_images_of_the_same_shape():
    digits = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.int32)
    variants = ood_variants(digits)
    assert {"digits", "all black", "inverted", "uniform noise", "shifted", "upside down"} <= set(variants)
    for name, imgs in variants.items():
        assert imgs.shape == digits.shape and imgs.dtype == torch.int32, name
        assert 0 <= imgs.min() and imgs.max() <= 255, name
    assert torch.equal(variants["inverted"], 255 - digits) and not variants["all black"].any()


def test_latent_norms_and_typicality_scores_per_image():
    model = perturb_(create_flow("multiscale"), scale=0.01).eval()
    imgs = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.int32)
    norms = latent_norms(model, imgs, batch_size=4)
    assert norms.shape == (6,) and (norms > 0).all()
    scores = typicality_score(model, imgs[:3], imgs[3:])
    assert scores.shape == (3,) and (scores >= 0).all()


def test_separation_auc_is_chance_for_equal_scores_and_one_for_perfect_separation():
    a = torch.tensor([0.1, 0.2, 0.3])
    assert separation_auc(a, a + 10) == 1.0 and separation_auc(a + 10, a) == 0.0
    assert separation_auc(torch.ones(4), torch.ones(4)) == 0.5
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="out_scores holds 1 NaN or infinite"):
            separation_auc(a, torch.tensor([1.0, bad]))


def test_bpd_terms_add_up_to_the_one_sample_bpd_and_measure_the_whole_latent():
    model = perturb_(create_flow("multiscale"), scale=0.01).double()
    imgs = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.int32)
    torch.manual_seed(0)
    terms = bpd_terms(model, imgs)
    torch.manual_seed(0)
    expected = model.bits_per_dim(imgs).float()
    assert torch.allclose(terms["prior"] + terms["volume"], terms["bpd"], atol=1e-5)
    assert torch.allclose(terms["bpd"], expected, atol=1e-5), "the terms must add up to the model's own bpd"
    torch.manual_seed(0)
    z, _, splits = model.encode(imgs, return_splits=True)
    whole = torch.cat([z.flatten(1), *[s.flatten(1) for s in splits]], dim=1)
    assert whole.shape[1] == 784 and torch.allclose(terms["norm"], whole.norm(dim=1).float(), atol=1e-4)
