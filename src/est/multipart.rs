// placeholder until the real module lands
pub struct MultipartBody {
    pub content_type: String,
    pub body: Vec<u8>,
}
pub fn serverkeygen_answer(_k: &[u8], _p: &[u8]) -> MultipartBody {
    MultipartBody {
        content_type: String::new(),
        body: vec![],
    }
}
