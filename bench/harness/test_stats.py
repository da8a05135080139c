"""Unit tests for the harness's statistics (run by scripts/test:
`python3 -m unittest discover -s bench -t bench -p 'test_*.py'`)."""

import unittest

from harness.stats import median, median_ci


class MedianCi(unittest.TestCase):
    def test_order_statistics_for_15_rounds(self):
        # P(Binomial(15, 1/2) <= 3) = 576 / 32768: ranks 4 and 12, coverage 96.5%.
        vals = [float(v) for v in range(1, 16)]
        lo, hi, coverage = median_ci(list(reversed(vals)))
        self.assertEqual((lo, hi), (4.0, 12.0))
        self.assertAlmostEqual(coverage, 1 - 2 * 576 / 32768)

    def test_six_rounds_is_the_smallest_with_an_interval(self):
        self.assertIsNone(median_ci([1, 2, 3, 4, 5]))
        self.assertEqual(median_ci([6, 1, 5, 2, 4, 3])[:2], (1, 6))

    def test_missing_rounds_are_left_out(self):
        vals = [1.0, None, 2.0, float("nan"), 3.0, 4.0, 5.0, 6.0]
        self.assertEqual(median_ci(vals)[:2], (1.0, 6.0))
        self.assertEqual(median(vals), 3.5)

    def test_the_interval_holds_the_median(self):
        vals = [0.13, 0.9, 0.4, 0.51, 1.86, 0.3, 0.35, 0.6, 0.79, 0.45, 0.2, 0.55, 0.7, 0.5, 0.48]
        lo, hi, _ = median_ci(vals)
        self.assertLessEqual(lo, median(vals))
        self.assertLessEqual(median(vals), hi)


if __name__ == "__main__":
    unittest.main()
