"""SSN: the paper profile's parameter count against the release's, derived layer by layer."""

from method_helpers import build_paper, n_params  # tests/fixtures, on sys.path by tests/conftest.py


def test_ssn_count_equals_the_release_derivation_minus_the_binary_head():
    """likelihoods.proposed (MiguelMonteiro/PHiSeg-code), layer by layer: 3x3 convs without bias + BN (gamma,
    beta), decoder level jj at num_channels[6 - jj], three 1x1 recombination convs, 1x1 heads with bias."""
    ch = [32, 64, 128, 192, 192, 192, 192]
    block = lambda cin, c: 9 * cin * c + 2 * c + 2 * (9 * c * c + 2 * c)  # noqa: E731
    total, cin = 0, 1
    for c in ch:
        total += block(cin, c)
        cin = c
    below = ch[6]
    for jj in range(6):
        ii = 6 - jj
        total += block(below + ch[ii - 1], ch[ii])
        below = ch[ii]
    total += 64 * 32 + 64 + 2 * (32 * 32 + 64)
    release_heads = 2 * (32 * 2 + 2) + (32 * 20 + 20)  # 2 classes, rank 10
    total += release_heads
    assert total == 10_320_568
    ours_heads = 2 * (32 + 1) + (32 * 10 + 10)  # one logit per pixel
    assert n_params(build_paper("ssn")) == total - release_heads + ours_heads == 10_320_172
