//! The throwaway PKI of one test control plane: a CA, the API server's serving
//! certificate, client certificates, and the service-account signing key.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::error::{IoContext, Result};

/// Paths of the PEM files written by [`Pki::generate`], and the CA that signed them (kept in
/// memory to issue more client certificates later, e.g. for a node's kubelet).
pub(crate) struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    pub(crate) ca_cert: PathBuf,
    pub(crate) serving_cert: PathBuf,
    pub(crate) serving_key: PathBuf,
    pub(crate) admin_cert: PathBuf,
    pub(crate) admin_key: PathBuf,
    pub(crate) controller_manager_cert: PathBuf,
    pub(crate) controller_manager_key: PathBuf,
    /// Signs service-account tokens (API server) and token secrets (controller manager);
    /// the API server derives the verifying public key from the same file.
    pub(crate) service_account_key: PathBuf,
    /// The public half of `service_account_key` (PKIX): the API server's verifying key file
    /// reads no PKCS#8 private keys.
    pub(crate) service_account_public_key: PathBuf,
}

/// Names under which in-cluster clients reach the API server, plus loopback; the address the
/// API server listens on is added to these.
const SERVING_NAMES: &[&str] = &[
    "127.0.0.1",
    "localhost",
    "10.0.0.1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

/// First address of `--service-cluster-ip-range`, the `kubernetes` Service's IP.
pub(crate) const SERVICE_CIDR: &str = "10.0.0.0/24";

impl Pki {
    /// A new CA and the control plane's certificates; `address` (where the API server
    /// listens) joins the serving certificate's names.
    pub(crate) fn generate(dir: &Path, address: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
        let ca = certificate_authority()?;
        let write = |name: &str, pem: String| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, pem).context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };

        let ca_cert = write("ca.crt", ca.pem())?;
        let mut serving_names = SERVING_NAMES.to_vec();
        if !serving_names.contains(&address) {
            serving_names.push(address);
        }
        let (serving_cert, serving_key) = leaf(
            &ca,
            "kube-apiserver",
            None,
            &serving_names,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (admin_cert, admin_key) = leaf(
            &ca,
            "petl-test-admin",
            Some("system:masters"),
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let (kcm_cert, kcm_key) = leaf(
            &ca,
            "system:kube-controller-manager",
            None,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let service_account = KeyPair::generate()?;
        let service_account_key = service_account.serialize_pem();
        let service_account_public_key = service_account.public_key_pem();
        Ok(Self {
            dir: dir.to_path_buf(),
            ca,
            ca_cert,
            serving_cert: write("apiserver.crt", serving_cert)?,
            serving_key: write("apiserver.key", serving_key)?,
            admin_cert: write("admin.crt", admin_cert)?,
            admin_key: write("admin.key", admin_key)?,
            controller_manager_cert: write("kube-controller-manager.crt", kcm_cert)?,
            controller_manager_key: write("kube-controller-manager.key", kcm_key)?,
            service_account_key: write("service-account.key", service_account_key)?,
            service_account_public_key: write("service-account.pub", service_account_public_key)?,
        })
    }
}

impl Pki {
    /// A client certificate for `user` in `group` (Kubernetes reads CN as the user and O as
    /// the group), written as `<file_stem>.crt` and `.key`. Returns (certificate, key).
    pub(crate) fn issue_client(
        &self,
        file_stem: &str,
        user: &str,
        group: Option<&str>,
    ) -> Result<(PathBuf, PathBuf)> {
        let (cert, key) = leaf(
            &self.ca,
            user,
            group,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let cert_path = self.dir.join(format!("{file_stem}.crt"));
        let key_path = self.dir.join(format!("{file_stem}.key"));
        std::fs::write(&cert_path, cert).context(|| format!("writing {}", cert_path.display()))?;
        std::fs::write(&key_path, key).context(|| format!("writing {}", key_path.display()))?;
        Ok((cert_path, key_path))
    }
}

fn certificate_authority() -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "petl-test-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

/// A certificate signed by `ca`; Kubernetes maps CN to the user and O to a group (rcgen keeps
/// one value per attribute, so one group). Returns (certificate PEM, private key PEM).
fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    common_name: &str,
    organization: Option<&str>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> Result<(String, String)> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}
