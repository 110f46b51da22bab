"""engine.evaluate's soft confusion: the main rule's softmax averaged per true class, next to
the hard counts, on a real (tiny) SSAL model."""
import torch

import ssal_models
from pipeline.train import engine
from ssal_models.grouping import random_grouping

C = 6


def test_soft_confusion_is_the_mean_softmax_per_true_class():
    torch.manual_seed(0)
    model = ssal_models.build_model("resnet18", "ssal", C, groupings=[random_grouping(C, 3)])
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 4, 4, 5, 1, 0, 4])  # class 3 has no image
    images = torch.randn(labels.numel(), 3, 32, 32, generator=generator)
    loader = [(images[:5], labels[:5]), (images[5:], labels[5:])]
    soft = torch.full((C, C), float("nan"))
    metrics, hard = engine.evaluate(model, loader, device=torch.device("cpu"), amp="none", num_classes=C,
                                    soft_out=soft)
    model.eval()
    with torch.no_grad():
        probs = model.method.predict(model(images))["main"].exp()
    for c in range(C):
        rows = probs[labels == c]
        expected = rows.mean(dim=0) if len(rows) else torch.zeros(C)
        torch.testing.assert_close(soft[c], expected, atol=1e-6, rtol=1e-5)
    assert torch.allclose(soft.sum(dim=1), (hard.sum(dim=1) > 0).float(), atol=1e-5)
    assert hard.sum() == labels.numel() and metrics["val/samples"] == labels.numel()
    # without soft_out nothing else changes
    metrics_plain, hard_plain = engine.evaluate(model, loader, device=torch.device("cpu"), amp="none",
                                                num_classes=C)
    assert torch.equal(hard_plain, hard) and metrics_plain == metrics
