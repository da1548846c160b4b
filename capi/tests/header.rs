//! The committed header, capi/include/deepport.h, is what cbindgen makes
//! of src/lib.rs today. `DEEPPORT_BLESS=1 cargo test -p deepport-capi
//! --test header` rewrites it.

use std::path::Path;

#[test]
fn header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("UTF-8 header");
    let path = dir.join("include/deepport.h");
    if std::env::var_os("DEEPPORT_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write the header");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "capi/include/deepport.h is stale: regenerate it with \
         DEEPPORT_BLESS=1 cargo test -p deepport-capi --test header"
    );
    // The declarations a C program needs are there.
    for f in [
        "deepport_last_error",
        "deepport_backend_create",
        "deepport_tensor_upload",
        "deepport_op_run",
        "deepport_model_decode",
        "DEEPPORT_STATUS_NOT_SUPPORTED",
        "DEEPPORT_D_TYPE_BF16",
    ] {
        assert!(generated.contains(f), "{f} missing from the header");
    }
}
