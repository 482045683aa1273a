"""The contract the references and the fused paths share (docs/design.md §1): the random-number
streams and seed, label mapping, masks, grouping and class statistics, and each method's steps
that are not kernels. It imports only torch (and numpy); pixcon.reference and pixcon.ops both
import it and it imports neither, so a reference stays a reference: no fused path or bank
imports pixcon.reference, and a bug in a kernel cannot hide behind the code it is tested
against."""
