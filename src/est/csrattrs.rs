// placeholder until the real module lands
pub enum CsrAttr {
    Oid(der::asn1::ObjectIdentifier),
}
pub fn parse_csr_attr(s: &str) -> Result<CsrAttr, String> {
    let _ = s;
    Ok(CsrAttr::Oid(der::asn1::ObjectIdentifier::new_unwrap(
        "1.2.3",
    )))
}
pub fn encode_csrattrs(_a: &[CsrAttr]) -> Vec<u8> {
    vec![0x30, 0]
}
