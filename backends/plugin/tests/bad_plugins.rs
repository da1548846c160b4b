//! Broken plugins are clear errors, never a crash: each test compiles
//! tests/broken.c with one defect (`-DBROKEN_...`) with the system C
//! compiler (`$CC` or `cc`) and checks the error names it.

use deepport_core::ops::{self, Add};
use deepport_core::{Backend, DType, HostTensor};
use deepport_plugin::Plugin;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn build(defect: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("broken-plugins");
    std::fs::create_dir_all(&dir).expect("create the test directory");
    let out = dir.join(format!("libbroken_{}.so", defect.to_lowercase()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let mut cmd = std::process::Command::new(&cc);
    cmd.args(["-shared", "-fPIC", "-std=c11", "-o"])
        .arg(&out)
        .arg("-I")
        .arg(manifest.join("../../plugin/include"))
        .arg(manifest.join("tests/broken.c"));
    if let Some(ext) = defect.strip_prefix("EXT_") {
        cmd.arg(format!("-DEXT_{ext}"));
    } else if !defect.is_empty() {
        cmd.arg(format!("-DBROKEN_{defect}"));
    }
    let st = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(st.success(), "compiling broken.c with {defect} failed");
    out
}

fn load_err(defect: &str) -> String {
    match Plugin::load(&build(defect)) {
        Ok(p) => panic!("the plugin with defect {defect} loaded: {p:?}"),
        Err(e) => e.to_string(),
    }
}

fn backend(defect: &str) -> deepport_plugin::PluginBackend {
    let p = Arc::new(Plugin::load(&build(defect)).expect("loads"));
    p.create(None).expect("creates")
}

fn run_add(b: &dyn Backend) -> deepport_core::Result<()> {
    let x = b.upload(&HostTensor::from_f32(
        DType::F32,
        &[4],
        &[1.0, 2.0, 3.0, 4.0],
    ))?;
    let mut out = b.alloc(DType::F32, &[4])?;
    ops::run(
        b,
        Add {
            a: &x,
            b: &x,
            out: &mut out,
        },
    )
}

#[test]
fn the_intact_plugin_loads_and_reports_its_device_error() {
    let b = backend("");
    let e = run_add(&b).expect_err("add returns DP_DEVICE_ERROR");
    let s = e.to_string();
    assert!(s.contains("broken plugin message"), "{s}");
    assert!(b
        .supports(deepport_core::ops::OpKind::Add, &[DType::F32; 3])
        .is_supported());
    // NULL op pointers are NotSupported, without a call.
    assert!(!b
        .supports(deepport_core::ops::OpKind::Gemm, &[DType::BF16; 3])
        .is_supported());
}

#[test]
fn missing_entry_symbol() {
    let e = load_err("NO_ENTRY");
    assert!(e.contains("does not export `deepport_plugin_entry`"), "{e}");
}

#[test]
fn refused_version() {
    let e = load_err("REFUSE");
    assert!(e.contains("refused this host's ABI version 1"), "{e}");
}

#[test]
fn version_mismatch() {
    let e = load_err("VERSION");
    assert!(
        e.contains("ABI version mismatch: the plugin implements version 99"),
        "{e}"
    );
}

#[test]
fn short_vtable() {
    let e = load_err("SIZE");
    assert!(e.contains("its vtable is 16 bytes"), "{e}");
}

#[test]
fn a_table_from_before_newer_ops_loads_without_them() {
    // A plugin built when the op list ended before `add`: its table is
    // shorter; the ops it lacks are NotSupported, nothing past it is read.
    let b = backend("OLD_TABLE");
    assert!(!b
        .supports(deepport_core::ops::OpKind::Add, &[DType::F32; 3])
        .is_supported());
    let e = run_add(&b).expect_err("add is beyond the table");
    assert!(e.is_not_supported(), "{e}");
    b.synchronize().expect("the rest works");
}

#[test]
fn null_required_function() {
    let e = load_err("NO_ALLOC");
    assert!(
        e.contains("required function(s) missing (NULL) in the vtable: alloc"),
        "{e}"
    );
}

#[test]
fn bad_name() {
    let e = load_err("NAME");
    assert!(e.contains("\"Bad Name!\" is not 1 to 64 characters"), "{e}");
}

#[test]
fn negative_device_count() {
    let p = Arc::new(Plugin::load(&build("DEVICE_COUNT")).expect("loads"));
    let e = p.create(None).err().expect("no backend").to_string();
    assert!(e.contains("device_count returned -3"), "{e}");
}

#[test]
fn null_context() {
    let p = Arc::new(Plugin::load(&build("NULL_CTX")).expect("loads"));
    let e = p.create(None).err().expect("no backend").to_string();
    assert!(
        e.contains("create returned DP_OK and a NULL context"),
        "{e}"
    );
}

#[test]
fn null_handle() {
    let b = backend("NULL_HANDLE");
    let e = b
        .alloc(DType::F32, &[4])
        .expect_err("NULL handle")
        .to_string();
    assert!(e.contains("alloc returned DP_OK and a NULL handle"), "{e}");
}

#[test]
fn garbage_status_from_an_op() {
    let b = backend("OP_STATUS");
    let e = run_add(&b).expect_err("status 42").to_string();
    assert!(
        e.contains("add returned status 42, which is not a dp_status"),
        "{e}"
    );
}

#[test]
fn garbage_status_from_memory() {
    let b = backend("UPLOAD_STATUS");
    let e = b
        .upload(&HostTensor::zeros(DType::F32, &[2]))
        .expect_err("status -17")
        .to_string();
    assert!(e.contains("upload returned status -17"), "{e}");
}

#[test]
fn garbage_supports_answer() {
    let b = backend("SUPPORTS");
    match b.supports(deepport_core::ops::OpKind::Add, &[DType::F32; 3]) {
        deepport_core::Support::NotSupported(r) => {
            assert!(r.contains("supports() returned 7"), "{r}")
        }
        s => panic!("a garbage answer was taken as {s:?}"),
    }
}

#[test]
fn not_a_library() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let f = dir.join("not_a_plugin.so");
    std::fs::write(&f, b"this is not an ELF file").expect("write");
    let e = Plugin::load(&f).expect_err("not a library").to_string();
    assert!(e.contains("cannot load the library"), "{e}");
}

// ---- ABI 1.1 extensions ------------------------------------------------------

fn download_one(b: &dyn Backend) -> deepport_core::Result<HostTensor> {
    let t = b.upload(&HostTensor::zeros(DType::F32, &[2]))?;
    b.download(&t)
}

#[test]
fn a_plugin_without_extensions_loads_and_lacks_them() {
    let p = Arc::new(Plugin::load(&build("")).expect("a 1.0 plugin loads"));
    assert!(p.extensions().is_empty());
    assert_eq!(p.abi_minor(), 0);
    let b = p.create(None).expect("creates");
    download_one(&b).expect("downloads without poll_error");
    b.synchronize().expect("synchronizes");
    // SAFETY: NULL is a valid stream argument.
    let e = unsafe { b.set_stream(std::ptr::null_mut()) }.expect_err("no set_stream");
    assert!(e.is_not_supported(), "{e}");
    assert!(e.to_string().contains("no set_stream"), "{e}");
}

#[test]
fn a_deferred_error_surfaces_once_at_the_next_download() {
    let p = Arc::new(Plugin::load(&build("EXT_DEFERRED")).expect("loads"));
    assert_eq!(p.extensions(), ["poll_error", "set_stream"]);
    assert_eq!(p.abi_minor(), 1);
    let b = p.create(None).expect("creates");
    let e = download_one(&b)
        .expect_err("the deferred error")
        .to_string();
    assert!(
        e.contains("DP_INDEX_OUT_OF_RANGE reported by poll_error"),
        "{e}"
    );
    assert!(e.contains("broken plugin message"), "{e}");
    download_one(&b).expect("reported once");
    b.synchronize().expect("and not again at synchronize");
    // set_stream answers a garbage status: a clear error.
    // SAFETY: the test plugin ignores the stream.
    let e = unsafe { b.set_stream(std::ptr::null_mut()) }.expect_err("status 99");
    assert!(
        e.to_string().contains("set_stream returned status 99"),
        "{e}"
    );
}

#[test]
fn garbage_status_from_poll_error() {
    let b = backend("EXT_GARBAGE");
    let e = b.synchronize().expect_err("status 77").to_string();
    assert!(
        e.contains("poll_error returned status 77, which is not a dp_status"),
        "{e}"
    );
}

#[test]
fn extension_tables_short_null_or_broken() {
    // A NULL table, NULL functions and a table of an older minor (only the
    // header): no extensions, the plugin works.
    for v in ["EXT_NULL_TABLE", "EXT_NULL_FUNCTIONS", "EXT_SHORT"] {
        let p = Arc::new(Plugin::load(&build(v)).expect("loads"));
        assert!(p.extensions().is_empty(), "{v}: {:?}", p.extensions());
        let b = p.create(None).expect("creates");
        download_one(&b).unwrap_or_else(|e| panic!("{v}: {e}"));
    }
    let e = load_err("EXT_SIZE");
    assert!(
        e.contains("extension table (`deepport_plugin_ext`) is 4 bytes"),
        "{e}"
    );
}
