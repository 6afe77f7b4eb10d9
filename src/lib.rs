//! Integration tests and examples of mlx-models live in tests/ and examples/.
