from convert.hf_to_jax import main

if __name__ == "__main__":
    raise SystemExit(main())
