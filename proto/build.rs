fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment yet.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
        }
    }
    tonic_prost_build::configure()
        .skip_debug(["zonemesh.v1.EnrollRequest", "zonemesh.v1.DomainCertificate"])
        .compile_protos(&["proto/zonemesh.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/zonemesh.proto");
    Ok(())
}
