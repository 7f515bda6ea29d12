"""The run directory's folders of the two evaluations: the evaluate stage writes them, the report reads them."""

#: ``hspace evaluate`` (Table 1 at the fixed scale, Fig. 6) and ``hspace evaluate-calibrated`` (Table 1 at the
#: calibrated strengths, the dose-response sweep and its strips, the SAE family)
FIXED, CALIBRATED = "evaluation", "evaluation-calibrated"
