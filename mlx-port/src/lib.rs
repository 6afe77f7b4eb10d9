//! Porting toolkit: fixtures exported from Transformers, the comparison engine and reports.
